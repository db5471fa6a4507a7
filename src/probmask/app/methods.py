"""Sparsification methods by name: ``prune.method`` in a config builds a :class:`~probmask.MaskedModel`.

The runner drives every method through the base's interface alone: it trains
``weight_parameters()`` with SGD and ``score_parameters()`` with Adam, calls ``set_epoch`` once per
epoch, makes ``passes(train.samples)`` forward/backward passes per minibatch, calls ``step()``
after every optimizer step, ``fix_mask(score_fn=..., generator=...)`` after the main phase, and
``finalize()`` at the end. A new method is a ``MaskedModel`` subclass plus a builder registered
here with ``@METHODS.register(name)``.

Registered: ``probmask`` (the default) and the baselines of :mod:`probmask.app.baselines`:
``dense``, ``gmp``, ``gmp_uniform``, ``oneshot``, ``random``, ``edgepopup``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn

from probmask.app.baselines import Dense, EdgePopup, Magnitude, RandomMask
from probmask.app.config import PruneConfig
from probmask.app.errors import UserError
from probmask.app.models import prune_include
from probmask.app.registry import Registry
from probmask.masked import MaskedModel
from probmask.schedules import CubicBudget, TemperatureSchedule
from probmask.sparsifier import ProbMask

__all__ = ["METHODS", "build_method"]

Builder = Callable[[nn.Module, PruneConfig], MaskedModel]
METHODS: Registry[Builder] = Registry("prune.method")

_SUPERMASK = ("probmask", "edgepopup")  # the methods that can find supermasks of frozen random weights


def build_method(model: nn.Module, cfg: PruneConfig) -> MaskedModel:
    """Attach method ``cfg.method`` to ``model``. A setting the method refuses (sparsity, floors,
    include/exclude patterns that match nothing) becomes a :class:`UserError`.

    An empty ``prune.include`` takes the patterns the model declares prunable
    (:func:`probmask.app.models.prune_include`, e.g. ``vit_tiny``'s attention input projections),
    so every method, a registered one included, prunes the same weights."""
    build = METHODS.get(cfg.method)
    if not cfg.include:
        cfg = dataclasses.replace(cfg, include=prune_include(model))
    if cfg.freeze_weights and cfg.method not in _SUPERMASK:
        raise UserError(
            f"prune.freeze_weights=true (supermask mode) is for {' and '.join(_SUPERMASK)}; "
            f"{cfg.method} trains the weights: set prune.freeze_weights=false"
        )
    try:
        return build(model, cfg)
    except ValueError as err:  # the library's checks of the arguments built from this config
        raise UserError(f"prune ({cfg.method}): {err}") from None


def _common(cfg: PruneConfig) -> dict[str, Any]:
    return {"include": list(cfg.include) or None, "exclude": list(cfg.exclude) or None, "floor": cfg.floor}


def _budget(cfg: PruneConfig) -> CubicBudget:
    return CubicBudget(1.0 - cfg.sparsity, cfg.budget_start, cfg.budget_end)


@METHODS.register("probmask")
def _probmask(model: nn.Module, cfg: PruneConfig) -> MaskedModel:
    """ProbMask (Zhou et al., CVPR 2021): learned keep-probabilities under one global budget."""
    return ProbMask(
        model, cfg.sparsity, **_common(cfg), freeze_weights=cfg.freeze_weights, score_init=cfg.score_init,
        budget=_budget(cfg), temperature=TemperatureSchedule(cfg.final_temperature),
        fix=cfg.fix, fix_samples=cfg.fix_samples,
    )


@METHODS.register("dense")
def _dense(model: nn.Module, cfg: PruneConfig) -> MaskedModel:
    return Dense(model, cfg.sparsity, **_common(cfg))


@METHODS.register("gmp")
def _gmp(model: nn.Module, cfg: PruneConfig) -> MaskedModel:
    return Magnitude(model, cfg.sparsity, schedule=_budget(cfg), interval=cfg.mask_interval, **_common(cfg))


@METHODS.register("gmp_uniform")
def _gmp_uniform(model: nn.Module, cfg: PruneConfig) -> MaskedModel:
    return Magnitude(model, cfg.sparsity, uniform=True, schedule=_budget(cfg), interval=cfg.mask_interval,
                     **_common(cfg))


@METHODS.register("oneshot")
def _oneshot(model: nn.Module, cfg: PruneConfig) -> MaskedModel:
    return Magnitude(model, cfg.sparsity, **_common(cfg))


@METHODS.register("random")
def _random(model: nn.Module, cfg: PruneConfig) -> MaskedModel:
    return RandomMask(model, cfg.sparsity, **_common(cfg))


@METHODS.register("edgepopup")
def _edgepopup(model: nn.Module, cfg: PruneConfig) -> MaskedModel:
    if not cfg.freeze_weights:
        raise UserError(
            "edgepopup finds supermasks of frozen random weights: set prune.freeze_weights=true "
            "(compare it with probmask under the same flag)"
        )
    return EdgePopup(model, cfg.sparsity, **_common(cfg))
