"""ProbMask inside a training loop that someone else owns, driven one optimizer step at a time.

The callbacks for Hugging Face's ``Trainer`` and for Lightning are thin adapters around
:class:`StepDriver`. The driver owns the :class:`~probmask.ProbMask`, the scores' own Adam
optimizer and the phase logic:

- steps ``0 .. fix_step``: the scores learn; the budget and temperature schedules run over these
  steps (the budget reaches its target at ``budget_end`` of them, the temperature its final value
  at ``fix_step``); after every optimizer step the scores are projected onto the budget;
- at ``fix_step = round(fix_at * max_steps)`` the mask is fixed with the exact budget (top-k);
- the remaining steps finetune the weights under the fixed mask;
- :meth:`StepDriver.finish` fixes the mask if training stopped early and finalizes the model in
  place: a plain module of its own class, exactly ``target_kept`` weights kept.

Under several processes the scores' gradients are averaged across ranks before each step, so the
scores (and the fixed mask) are identical on every rank.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from probmask.budget import FloorSpec, check_sparsity
from probmask.schedules import CubicBudget
from probmask.selection import DEFAULT_MODULE_TYPES, select_targets
from probmask.sparsifier import ProbMask

__all__ = ["StepDriver"]

log = logging.getLogger(__name__)

_STATE_VERSION = 1


class StepDriver:
    """ProbMask for one model, advanced by optimizer steps (see the module docstring).

    Args:
        sparsity: fraction of the prunable weights removed at the end, in (0, 1).
        fix_at: fraction of the trainer's steps after which the mask is fixed (the rest finetune).
        score_lr: learning rate of the scores' Adam optimizer (no weight decay).
        budget_start, budget_end: where the cubic budget schedule starts shrinking and reaches the
            target, as fractions of the steps before ``fix_at``.
        score_init: initial keep-probability of every weight.
        module_types, include, exclude, floor: which weights are prunable and their per-layer
            floors, as for :class:`~probmask.ProbMask`.
    """

    def __init__(
        self,
        sparsity: float,
        *,
        fix_at: float = 0.8,
        score_lr: float = 0.03,
        budget_start: float = 0.16,
        budget_end: float = 0.6,
        score_init: float = 1.0,
        module_types: Sequence[type[nn.Module]] = DEFAULT_MODULE_TYPES,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        floor: FloorSpec = "auto",
    ) -> None:
        if not (isinstance(fix_at, (int, float)) and 0.0 < fix_at <= 1.0):
            raise ValueError(f"fix_at is a fraction of the training steps in (0, 1], got {fix_at!r}")
        if not (isinstance(score_lr, (int, float)) and score_lr > 0 and math.isfinite(score_lr)):
            raise ValueError(f"score_lr must be a positive number, got {score_lr!r}")
        self.sparsity = check_sparsity(sparsity)
        self.budget = CubicBudget(1.0 - self.sparsity, budget_start, budget_end)  # checks the window
        self.fix_at, self.score_lr, self.score_init = float(fix_at), float(score_lr), float(score_init)
        self._select = {"module_types": module_types, "include": include, "exclude": exclude, "floor": floor}
        self.probmask: ProbMask | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.max_steps = 0
        self.fix_step = 0
        self._pending: dict[str, Any] | None = None  # a state loaded before attach

    # ------------------------------------------------------------------ set-up
    @property
    def attached(self) -> bool:
        return self.probmask is not None

    def attach(self, model: nn.Module) -> ProbMask:
        """Put the masks on ``model`` (in place) and create the scores' optimizer."""
        if self.probmask is not None:
            if self.probmask.model is model:
                return self.probmask
            raise RuntimeError("this ProbMask callback is already attached to another model; use one per model")
        exclude = _with_tied(model, self._select)
        self.probmask = ProbMask(model, self.sparsity, module_types=self._select["module_types"],
                                 include=self._select["include"], exclude=exclude, floor=self._select["floor"],
                                 score_init=self.score_init, budget=self.budget)
        self.optimizer = torch.optim.Adam(self.probmask.score_parameters(), lr=self.score_lr, weight_decay=0.0)
        if self._pending is not None:
            state, self._pending = self._pending, None
            self.load_state_dict(state)
        return self.probmask

    def start(self, max_steps: float | int | None, step: int, where: str) -> None:
        """Learn the length of training (``where`` names the setting for the error) and the current step."""
        pm = self._live()
        if max_steps is None or not math.isfinite(float(max_steps)) or int(max_steps) < 1:
            raise ValueError(
                f"ProbMask needs the number of optimizer steps in advance to run its schedules, but the "
                f"trainer does not know it ({where} gives {max_steps!r}); set max_steps, or train on data "
                f"with a length and a finite number of epochs"
            )
        self.max_steps = int(max_steps)
        self.fix_step = max(1, round(self.fix_at * self.max_steps))
        if pm._fixed and step < self.fix_step:
            raise ValueError(f"the restored mask is already fixed, but training restarts at step {step}, "
                             f"before the fix step {self.fix_step}; resume from the checkpoint it was saved with")
        self._set_position(step)
        log.info("ProbMask: %d optimizer steps; the mask is fixed after step %d, then the weights finetune",
                 self.max_steps, self.fix_step)

    # ------------------------------------------------------------------ every step
    @torch.no_grad()
    def optimizer_step(self, grad_scale: float = 1.0) -> bool:
        """Step the scores with their gradients (divided by ``grad_scale``, the mixed-precision
        loss scale) and project them; call once per optimizer step of the trainer, before it
        zeroes the gradients. Under loss scaling, skips a step whose gradients are not finite, as
        the scaler does; returns whether it stepped."""
        pm = self._live()
        if pm._fixed:
            return False
        assert self.optimizer is not None
        scores = pm.scores
        if scores.grad is None:
            scores.grad = torch.zeros_like(scores)
        grad = scores.grad
        world = _world_size()
        if world > 1:
            torch.distributed.all_reduce(grad, op=torch.distributed.ReduceOp.SUM)
            grad.div_(world)
        finite = True
        if grad_scale != 1.0:  # a loss scaler overflows now and then: skip that step, as it does
            grad.div_(grad_scale)
            finite = bool(torch.isfinite(grad).all())  # otherwise the projection's own check catches NaN
        if finite:
            self.optimizer.step()
            pm.step()  # the projection
        else:
            log.warning("ProbMask: non-finite score gradients at this step (loss scaling?); step skipped")
        self.optimizer.zero_grad(set_to_none=True)
        return finite

    def after_step(self, step: int) -> None:
        """After the trainer's ``step``-th optimizer step: move the schedules; fix the mask at the fix step."""
        pm = self._live()
        if not pm._fixed and step >= self.fix_step:
            pm.fix_mask("topk")
            log.info("ProbMask: mask fixed at step %d, %d of %d weights kept", step, pm.target_kept, pm.total)
        self._set_position(step)

    def finish(self) -> nn.Module:
        """Fix the mask if it is not yet fixed and finalize the model in place; returns it."""
        pm = self._live()
        if not pm._fixed:
            pm.fix_mask("topk")
        model = pm.finalize()
        log.info("ProbMask: model finalized, %d of %d prunable weights kept (sparsity %.4f)",
                 pm.target_kept, pm.total, self.sparsity)
        return model

    def stats(self) -> dict[str, float]:
        """``density``, ``budget`` and ``temperature`` of the current step (see :meth:`ProbMask.stats`)."""
        return self._live().stats()

    def _set_position(self, step: int) -> None:
        pm = self._live()
        if not pm._fixed:
            pm.set_epoch(float(min(step, self.fix_step)), float(self.fix_step))

    def _live(self) -> ProbMask:
        if self.probmask is None:
            raise RuntimeError("the ProbMask callback is not attached to a model yet")
        if self.probmask._finalized:
            raise RuntimeError("training already finished: the model was finalized and is a plain module now")
        return self.probmask

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """Scores, schedule position, fixed mask and the scores' optimizer: all a resume needs."""
        pm = self._live()
        assert self.optimizer is not None
        return {"version": _STATE_VERSION, "probmask": pm.state_dict(), "optimizer": self.optimizer.state_dict(),
                "fix_at": self.fix_at, "max_steps": self.max_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError("this is not a state saved by a ProbMask callback of this version")
        if self.probmask is None:  # restored before the model is known: applied by attach
            self._pending = state
            return
        if float(state["fix_at"]) != self.fix_at:
            raise ValueError(f"the state was saved with fix_at={state['fix_at']}, this callback uses "
                             f"fix_at={self.fix_at}: create it with the same settings")
        self.probmask.load_state_dict(state["probmask"])
        assert self.optimizer is not None
        self.optimizer.load_state_dict(state["optimizer"])


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def tied_weights(model: nn.Module) -> dict[str, list[str]]:
    """Parameters reachable under more than one name (tied weights): first name -> the others."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return {group[0]: group[1:] for group in names.values() if len(group) > 1}


def _with_tied(model: nn.Module, select: dict[str, Any]) -> list[str] | None:
    """The ``exclude`` patterns plus every prunable weight that is tied to another parameter (a mask
    on one use of a shared tensor would untie it); the additions are logged."""
    exclude = select["exclude"]
    base = [] if exclude is None else [exclude] if isinstance(exclude, str) else list(exclude)
    tied = tied_weights(model)
    if not tied:
        return base or None
    shared = {n for first, rest in tied.items() for n in (first, *rest)}
    chosen = select_targets(model, select["module_types"], select["include"], None)
    skip = [t.name for t in chosen if t.name in shared]
    if skip:
        log.info("ProbMask: tied weights stay dense: %s", skip)
    return base + skip or None
