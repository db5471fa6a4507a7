"""Sparsification methods as the runner sees them: one small interface, a registry by name.

The runner trains ``method.weight_parameters()`` with SGD and ``method.score_parameters()`` (if
any) with Adam, calls :meth:`Method.begin_epoch` once per epoch, :meth:`Method.backward` for
every minibatch and :meth:`Method.after_step` after every optimizer step; after the main phase
it calls :meth:`Method.fix`, finetunes the weights under the fixed mask, and
:meth:`Method.finalize` returns the plain model with the masks. A new method (a dense baseline,
gradual magnitude pruning, ...) subclasses :class:`Method` and registers itself with
:func:`register_method`; ``prune.method`` in the config then names it. The baselines
(``dense``, ``gmp``, ``gmp_uniform``, ``oneshot``, ``random``, ``edgepopup``) live in
:mod:`probmask.app.baselines`, imported at the end of this module so that the registry always has them.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from probmask.app.config import PruneConfig
from probmask.app.errors import UserError
from probmask.report import Report
from probmask.schedules import CubicBudget, TemperatureSchedule
from probmask.sparsifier import ProbMask, accumulate_samples

__all__ = ["Method", "ProbMaskMethod", "build_method", "method_class", "method_names", "register_method"]


class Method(abc.ABC):
    """One way of making a model sparse, driven by the runner's training loop."""

    def __init__(self, model: nn.Module, cfg: PruneConfig) -> None:
        self.model = model
        self.cfg = cfg

    @abc.abstractmethod
    def weight_parameters(self) -> list[Tensor]:
        """Parameters trained by the weight optimizer (SGD) in the main phase and in finetuning."""

    def score_parameters(self) -> list[Tensor]:
        """Extra parameters trained by the score optimizer (Adam, ``train.score_lr``); none by default."""
        return []

    @property
    def finetunes(self) -> bool:
        """Whether the weights are finetuned after fixing the mask."""
        return True

    def begin_epoch(self, epoch: int, num_epochs: int) -> dict[str, float]:
        """Move schedules to ``epoch``; returns values worth logging (e.g. budget, temperature)."""
        return {}

    def backward(self, loss_fn: Callable[[], Tensor], samples: int) -> Tensor:
        """Run forward and backward for one minibatch; returns the detached loss."""
        loss = loss_fn()
        loss.backward()
        return loss.detach()

    def after_step(self) -> None:  # noqa: B027 - an optional hook
        """Called after every optimizer step (projections, mask updates)."""

    def stats(self) -> dict[str, float]:
        """Per-epoch figures for the metrics, e.g. the expected density."""
        return {}

    @property
    @abc.abstractmethod
    def fixed(self) -> bool:
        """True once :meth:`fix` has run (or was restored from a checkpoint)."""

    @abc.abstractmethod
    def fix(self, score_fn: Callable[[], float], generator: torch.Generator) -> None:
        """Fix the final binary mask (``score_fn`` scores the mask in place, higher is better)."""

    @abc.abstractmethod
    def report(self) -> Report:
        """Per-layer kept counts (exact once fixed)."""

    @abc.abstractmethod
    def finalize(self) -> tuple[nn.Module, dict[str, Tensor]]:
        """The plain model with the mask baked in, and the bool mask per parameter name."""

    def state_dict(self) -> dict[str, Any]:
        """Everything besides the model's own state needed to resume; tensors and plain values only."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - an optional hook
        """Restore what :meth:`state_dict` returned."""


_METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make ``prune.method=name`` build this class."""

    def decorate(cls: type[Method]) -> type[Method]:
        if name in _METHODS:
            raise ValueError(f"method name {name!r} is taken")
        _METHODS[name] = cls
        return cls

    return decorate


def method_names() -> list[str]:
    return sorted(_METHODS)


def method_class(name: str) -> type[Method]:
    cls = _METHODS.get(name)
    if cls is None:
        raise UserError(f"unknown prune.method {name!r}: choose one of {', '.join(method_names())}")
    return cls


def build_method(model: nn.Module, cfg: PruneConfig) -> Method:
    """Attach method ``cfg.method`` to ``model``; a bad setting becomes a :class:`UserError`."""
    cls = method_class(cfg.method)
    try:
        return cls(model, cfg)
    except ValueError as err:  # the library's checks of sparsity, floors, include/exclude patterns
        raise UserError(f"prune ({cfg.method}): {err}") from None


@register_method("probmask")
class ProbMaskMethod(Method):
    """ProbMask (Zhou et al., CVPR 2021): learned keep-probabilities under one global budget.

    K relaxed mask samples per minibatch, the exact projection after every step, the cubic budget
    and temperature schedules per epoch; the mask is fixed by top-k or best-of-N sampling. In
    supermask mode (``prune.freeze_weights``) nothing but the scores trains (biases and norm
    layers stay at their initial values too) and there is no finetuning.
    """

    def __init__(self, model: nn.Module, cfg: PruneConfig) -> None:
        super().__init__(model, cfg)
        self.pm = ProbMask(
            model,
            cfg.sparsity,
            include=list(cfg.include) or None,
            exclude=list(cfg.exclude) or None,
            floor=cfg.floor,
            freeze_weights=cfg.freeze_weights,
            score_init=cfg.score_init,
            budget=CubicBudget(1.0 - cfg.sparsity, cfg.budget_start, cfg.budget_end),
            temperature=TemperatureSchedule(cfg.final_temperature),
        )
        if cfg.freeze_weights:
            for p in self.pm.weight_parameters():
                p.requires_grad_(False)

    def weight_parameters(self) -> list[Tensor]:
        return [] if self.cfg.freeze_weights else list(self.pm.weight_parameters())

    def score_parameters(self) -> list[Tensor]:
        return [] if self.fixed else list(self.pm.score_parameters())

    @property
    def finetunes(self) -> bool:
        return not self.cfg.freeze_weights

    def begin_epoch(self, epoch: int, num_epochs: int) -> dict[str, float]:
        self.pm.set_epoch(epoch, num_epochs)
        return {"budget": self.pm.budget / self.pm.total, "temperature": self.pm.temperature}

    def backward(self, loss_fn: Callable[[], Tensor], samples: int) -> Tensor:
        # once the mask is fixed every sample would be the same mask: one pass is enough
        return accumulate_samples(loss_fn, 1 if self.fixed else samples)

    def after_step(self) -> None:
        self.pm.project()

    def stats(self) -> dict[str, float]:
        if self.fixed:
            assert self.pm.fixed_mask is not None
            return {"density": float(self.pm.fixed_mask.sum()) / self.pm.total}
        return {"density": float(self.pm.scores.detach().sum()) / self.pm.total}  # expected density

    @property
    def fixed(self) -> bool:
        return self.pm.fixed_mask is not None

    def fix(self, score_fn: Callable[[], float], generator: torch.Generator) -> None:
        self.pm.fix_mask(self.cfg.fix, num_samples=self.cfg.fix_samples, score_fn=score_fn, generator=generator)

    def report(self) -> Report:
        return self.pm.report()

    def finalize(self) -> tuple[nn.Module, dict[str, Tensor]]:
        masks = self.pm.masks()
        return self.pm.finalize(), masks

    def state_dict(self) -> dict[str, Any]:
        return self.pm.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pm.load_state_dict(state)


# the baselines register themselves with register_method; imported last, once Method exists
from probmask.app import baselines as _baselines  # noqa: E402,F401
