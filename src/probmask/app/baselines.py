"""Baseline methods behind the :class:`~probmask.app.methods.Method` interface (``prune.method=NAME``).

* ``dense`` -- no pruning: the accuracy ceiling (``prune.sparsity`` is ignored, nothing is cut).
* ``gmp`` -- gradual magnitude pruning (Zhu & Gupta 2017) with ONE global magnitude threshold
  across all prunable layers. The kept count follows ProbMask's cubic budget
  (:class:`~probmask.schedules.CubicBudget` with ``prune.budget_start`` / ``prune.budget_end``),
  evaluated at the fractional epoch every ``prune.mask_interval`` optimizer steps; pruned weights
  are held at zero (their gradients are masked too, so they also add nothing to the clipped norm
  or the momentum) and never come back.
* ``gmp_uniform`` -- the same schedule, but every layer is pruned to the same rate.
* ``oneshot`` -- dense training for the whole main phase, one global magnitude cut to the target
  at its end, then the finetune phase.
* ``random`` -- a random mask at the target rate in every layer, drawn once before training
  (from the run's seed) and trained for the whole budget.
* ``edgepopup`` -- supermasks (Ramanujan et al. 2020): the weights stay at their random
  initialisation, a score per weight is trained (Adam, ``train.score_lr``, like ProbMask's
  scores) and every forward pass keeps the top-k scores of each layer (the same rate in every
  layer), with the straight-through gradient ``dL/ds = dL/dw_eff * w``. It needs
  ``prune.freeze_weights=true``, the flag that also puts ProbMask in supermask mode, so that the
  two are compared under the same setting.

Exact budget: every pruning method ends with exactly ``floor((1 - sparsity) * n)`` kept weights,
ProbMask's target count. The global methods (``gmp``, ``oneshot``) honour the same per-layer
floors as ProbMask (``prune.floor``; "auto" keeps at least one weight per output unit when the
budget allows, and never leaves a layer empty). The uniform methods (``gmp_uniform``, ``random``,
``edgepopup``) keep the same fraction of every layer by definition: the per-layer counts are
that fraction rounded by largest remainders so that they add up to the target exactly, with at
least one weight per layer; ``prune.floor`` does not apply to them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from probmask.app.config import PruneConfig
from probmask.app.methods import Method, register_method
from probmask.fixing import topk_mask
from probmask.report import LayerReport, Report
from probmask.schedules import CubicBudget
from probmask.selection import select_targets
from probmask.sparsifier import resolve_floors

__all__ = [
    "DenseMethod",
    "EdgePopupMethod",
    "GlobalMagnitudeMethod",
    "OneShotMethod",
    "RandomMethod",
    "UniformMagnitudeMethod",
    "uniform_counts",
]


def uniform_counts(sizes: Sequence[int], k: int) -> list[int]:
    """Split ``k`` kept weights over layers of ``sizes`` at one rate: largest-remainder rounding of
    ``k * n_l / n``, at least 1 and at most ``n_l`` per layer, adding up to ``k`` exactly."""
    total = sum(sizes)
    if not len(sizes) <= k <= total:
        raise ValueError(f"cannot keep {k} of {total} weights with at least one in each of {len(sizes)} layers")
    quotas = [k * n / total for n in sizes]
    counts = [min(n, max(1, math.floor(q))) for q, n in zip(quotas, sizes)]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(quotas[i] - math.floor(quotas[i])), i))
    while sum(counts) < k:  # hand out the rounding remainder, largest fractional parts first
        for i in by_remainder:
            if sum(counts) < k and counts[i] < sizes[i]:
                counts[i] += 1
    while sum(counts) > k:  # the minimum of one pushed the sum over: take from the largest layers
        i = max((j for j in range(len(sizes)) if counts[j] > 1), key=lambda j: (counts[j] - quotas[j], counts[j]))
        counts[i] -= 1
    return counts


class _MaskedMethod(Method):
    """Shared machinery: the prunable weights (same selection as ProbMask), one flat bool mask,
    the exact target count and the per-layer floors; pruned weights are zeroed in place."""

    trains_weights = True

    def __init__(self, model: nn.Module, cfg: PruneConfig) -> None:
        super().__init__(model, cfg)
        if cfg.freeze_weights and self.trains_weights:
            raise ValueError(
                "prune.freeze_weights=true (supermask mode) is for probmask and edgepopup; "
                "this method trains the weights: set prune.freeze_weights=false"
            )
        self.targets = select_targets(model, include=list(cfg.include) or None, exclude=list(cfg.exclude) or None)
        self.params = [model.get_parameter(t.name) for t in self.targets]
        self.shapes = [tuple(p.shape) for p in self.params]
        self.sizes = [p.numel() for p in self.params]
        self.total = sum(self.sizes)
        self.target_kept = int(math.floor((1.0 - cfg.sparsity) * self.total + 1e-6))
        if self.target_kept < len(self.sizes):
            raise ValueError(
                f"sparsity {cfg.sparsity} of {self.total} prunable weights keeps {self.target_kept}, "
                f"fewer than one per prunable layer ({len(self.sizes)}); lower it"
            )
        rows = [p.shape[0] if p.dim() > 0 else 1 for p in self.params]
        self.floors = resolve_floors(cfg.floor, rows, self.sizes, self.target_kept, cfg.sparsity)
        self.mask = torch.ones(self.total, dtype=torch.bool, device=self.params[0].device)
        self._fixed = False

    # ------------------------------------------------------------------ masks
    def _views(self, flat: Tensor) -> list[Tensor]:
        return [part.view(shape) for part, shape in zip(flat.split(self.sizes), self.shapes)]

    @torch.no_grad()
    def _apply(self) -> None:
        """Hold the pruned weights at zero."""
        for p, m in zip(self.params, self._views(self.mask)):
            p.mul_(m)

    def _magnitudes(self) -> Tensor:
        return torch.cat([p.detach().abs().flatten().float() for p in self.params])

    def _global_mask(self, k: int) -> Tensor:
        """The ``k`` largest magnitudes over all layers, every layer at or above its floor."""
        return topk_mask(self._magnitudes(), k, self.sizes, self.floors)

    def _uniform_mask(self, k: int, values: Tensor | None = None) -> Tensor:
        """The largest ``values`` (default: magnitudes) of every layer, one rate for all layers."""
        values = self._magnitudes() if values is None else values
        mask = torch.zeros(self.total, dtype=torch.bool, device=values.device)
        for part, m, count in zip(values.split(self.sizes), mask.split(self.sizes), uniform_counts(self.sizes, k)):
            # topk, not a full sort: edgepopup does this every step (42 ms against 1-4 ms for a 235k layer)
            m[torch.topk(part, count, sorted=False).indices] = True
        return mask

    # ------------------------------------------------------------------ the Method interface
    def weight_parameters(self) -> list[Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def backward(self, loss_fn: Callable[[], Tensor], samples: int) -> Tensor:
        loss = loss_fn()
        loss.backward()
        if not bool(self.mask.all()):
            with torch.no_grad():
                for p, m in zip(self.params, self._views(self.mask)):
                    if p.grad is not None:
                        p.grad.mul_(m)
        return loss.detach()

    def after_step(self) -> None:
        self._apply()

    def stats(self) -> dict[str, float]:
        return {"density": float(self.mask.sum()) / self.total}

    @property
    def fixed(self) -> bool:
        return self._fixed

    def _final_mask(self) -> Tensor:
        """The mask fixed after the main phase (exactly ``target_kept`` ones)."""
        return self.mask

    def fix(self, score_fn: Callable[[], float], generator: torch.Generator) -> None:
        self.mask = self._final_mask()
        self._apply()
        self._fixed = True

    def report(self) -> Report:
        kept = [float(m.sum()) for m in self.mask.split(self.sizes)]
        layers = [
            LayerReport(t.name, shape, n, k, fl, bool(fl > 0 and k <= fl))
            for t, shape, n, k, fl in zip(self.targets, self.shapes, self.sizes, kept, self.floors)
        ]
        return Report(layers, fixed=self._fixed, target_kept=self.target_kept)

    def finalize(self) -> tuple[nn.Module, dict[str, Tensor]]:
        self._apply()
        return self.model, {t.name: m.clone() for t, m in zip(self.targets, self._views(self.mask))}

    def state_dict(self) -> dict[str, Any]:
        return {"mask": self.mask.clone(), "fixed": self._fixed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mask = state["mask"].to(device=self.mask.device, dtype=torch.bool).clone()
        self._fixed = bool(state["fixed"])


@register_method("dense")
class DenseMethod(_MaskedMethod):
    """No pruning: the same training (main phase and finetuning) with every weight kept."""

    def report(self) -> Report:
        report = super().report()
        return Report(report.layers, fixed=report.fixed, target_kept=self.total)


@register_method("oneshot")
class OneShotMethod(_MaskedMethod):
    """Dense main phase, one global magnitude cut to the exact target, then finetuning."""

    def _final_mask(self) -> Tensor:
        return self._global_mask(self.target_kept)


@register_method("random")
class RandomMethod(_MaskedMethod):
    """A random mask at the target rate in every layer, fixed before training starts."""

    def __init__(self, model: nn.Module, cfg: PruneConfig) -> None:
        super().__init__(model, cfg)
        # drawn from the global generator, which the runner seeds with the run's seed
        self.mask = self._uniform_mask(self.target_kept, torch.rand(self.total).to(self.mask.device))
        self._apply()


@register_method("gmp")
class GlobalMagnitudeMethod(_MaskedMethod):
    """Gradual magnitude pruning with one global threshold, following the cubic budget."""

    def __init__(self, model: nn.Module, cfg: PruneConfig) -> None:
        super().__init__(model, cfg)
        self.schedule = CubicBudget(1.0 - cfg.sparsity, cfg.budget_start, cfg.budget_end)
        self.epoch = 0
        self.num_epochs = 1
        self.steps = 0  # optimizer steps of the main phase so far
        self.epoch_first_step = 0
        self.steps_per_epoch = 0  # learnt from the first epoch; 0 until then

    def _mask_for(self, k: int) -> Tensor:
        return self._global_mask(k)

    def _update(self) -> float:
        """Prune to the budget of the current (fractional) epoch; returns the keep ratio."""
        progress = float(self.epoch)
        if self.steps_per_epoch:
            progress += min(1.0, (self.steps - self.epoch_first_step) / self.steps_per_epoch)
        keep = self.schedule(progress, self.num_epochs)
        k = max(self.target_kept, int(math.floor(keep * self.total + 1e-6)))
        if k < int(self.mask.sum()):
            self.mask = self._mask_for(k)
            self._apply()
        return keep

    def begin_epoch(self, epoch: int, num_epochs: int) -> dict[str, float]:
        if self.steps > self.epoch_first_step and not self.steps_per_epoch:
            self.steps_per_epoch = self.steps - self.epoch_first_step
        self.epoch, self.num_epochs, self.epoch_first_step = epoch, num_epochs, self.steps
        return {"budget": self._update()}

    def after_step(self) -> None:
        self._apply()
        if self._fixed:
            return
        self.steps += 1
        if self.steps % self.cfg.mask_interval == 0:
            self._update()

    def _final_mask(self) -> Tensor:
        return self._mask_for(self.target_kept)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "epoch": self.epoch, "num_epochs": self.num_epochs, "steps": self.steps,
                "epoch_first_step": self.epoch_first_step, "steps_per_epoch": self.steps_per_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for key in ("epoch", "num_epochs", "steps", "epoch_first_step", "steps_per_epoch"):
            setattr(self, key, int(state[key]))


@register_method("gmp_uniform")
class UniformMagnitudeMethod(GlobalMagnitudeMethod):
    """Gradual magnitude pruning with every layer pruned to the same rate."""

    def _mask_for(self, k: int) -> Tensor:
        return self._uniform_mask(k)


class _EdgePopupMask(nn.Module):
    """Parametrization: the weight times the owner's current top-k mask of this layer."""

    def __init__(self, owner: EdgePopupMethod, index: int) -> None:
        super().__init__()
        self._owner = [owner]  # a list: keeps the owner out of the module tree
        self.index = index

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self._owner[0].layer_mask(self.index).to(weight.dtype)


@register_method("edgepopup")
class EdgePopupMethod(_MaskedMethod):
    """Edge-popup supermasks: frozen random weights, per-layer top-k of trained scores."""

    trains_weights = False

    def __init__(self, model: nn.Module, cfg: PruneConfig) -> None:
        if not cfg.freeze_weights:
            raise ValueError(
                "edgepopup finds supermasks of frozen random weights: set prune.freeze_weights=true "
                "(compare it with probmask under the same flag)"
            )
        super().__init__(model, cfg)
        self.counts = uniform_counts(self.sizes, self.target_kept)
        device = self.params[0].device
        # scores of the same scale as ProbMask's probabilities, so the shared score lr suits both
        self.scores = torch.rand(self.total, device=device).requires_grad_(True)
        self.mask = self._uniform_mask(self.target_kept, self.scores.detach())
        self._requires_grad = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)  # supermask mode: nothing but the scores trains
        self._modules_ = [model.get_submodule(t.module_name) for t in self.targets]
        self._param_order = [list(m._parameters) for m in self._modules_]
        for index, (module, target) in enumerate(zip(self._modules_, self.targets)):
            parametrize.register_parametrization(module, target.param_name, _EdgePopupMask(self, index), unsafe=True)
        self._finalized = False

    def layer_mask(self, index: int) -> Tensor:
        """Hard top-k mask of layer ``index``; before fixing, with the straight-through score gradient."""
        start = sum(self.sizes[:index])
        hard = self.mask[start : start + self.sizes[index]].view(self.shapes[index])
        if self._fixed or not torch.is_grad_enabled():
            return hard
        scores = self.scores[start : start + self.sizes[index]].view(self.shapes[index])
        return hard + (scores - scores.detach())

    def weight_parameters(self) -> list[Tensor]:
        return []

    def score_parameters(self) -> list[Tensor]:
        return [] if self._fixed else [self.scores]

    @property
    def finetunes(self) -> bool:
        return False

    def backward(self, loss_fn: Callable[[], Tensor], samples: int) -> Tensor:
        loss = loss_fn()
        loss.backward()
        return loss.detach()

    @torch.no_grad()
    def after_step(self) -> None:
        if not self._fixed:  # the top-k of the updated scores is the next forward's mask
            self.mask = self._uniform_mask(self.target_kept, self.scores.detach())

    def _apply(self) -> None:  # the parametrization masks every read; the weights stay untouched
        pass

    def fix(self, score_fn: Callable[[], float], generator: torch.Generator) -> None:
        self.mask = self._uniform_mask(self.target_kept, self.scores.detach())
        self.scores.requires_grad_(False)
        self._fixed = True

    @torch.no_grad()
    def finalize(self) -> tuple[nn.Module, dict[str, Tensor]]:
        if self._finalized:
            raise RuntimeError("this edgepopup method was finalized already")
        masks = {t.name: m.clone() for t, m in zip(self.targets, self._views(self.mask))}
        for module, target in zip(self._modules_, self.targets):
            parametrize.remove_parametrizations(module, target.param_name, leave_parametrized=True)
        for module, order in zip(self._modules_, self._param_order):
            module._parameters = {name: module._parameters[name] for name in order}  # original key order
        for p, flag in zip(self.model.parameters(), self._requires_grad):
            p.requires_grad_(flag)
        self._finalized = True
        return self.model, masks

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "scores": self.scores.detach().clone()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.scores.copy_(state["scores"])
        self.scores.requires_grad_(not self._fixed)
