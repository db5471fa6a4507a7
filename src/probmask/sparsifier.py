"""The object users hold: ``ProbMask(model, sparsity)``.

A :class:`~probmask.masked.MaskedModel` whose mask is learned: every prunable weight gets a
keep-probability (one flat float32 tensor of scores), training samples relaxed masks from them,
the budget and temperature schedules move per epoch, the scores are projected onto the budget
after every optimizer step, and the mask is fixed with the exact budget at the end.

With ``granularity=NM(2, 4)`` the budget is N of every M consecutive input weights instead of one
global count (:mod:`probmask.nm`): the same training, a per-group projection and a top-N fix.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from probmask import kernels
from probmask.budget import FloorSpec
from probmask.fixing import sample_mask, topk_mask
from probmask.granularity import ELEMENT, Granularity
from probmask.masked import MaskedModel
from probmask.masks import MaskMode, relaxed_masked_weight, sample_masked_weights
from probmask.nm import NM, project_groups_, sample_nm_mask, topn_mask
from probmask.projection import project_
from probmask.schedules import CubicBudget, TemperatureSchedule
from probmask.selection import DEFAULT_MODULE_TYPES

__all__ = ["ProbMask", "accumulate_samples"]

log = logging.getLogger(__name__)

_FIX_METHODS = ("topk", "sample")


def accumulate_samples(loss_fn: Callable[[], Tensor], num_samples: int) -> Tensor:
    """Average a loss over ``num_samples`` mask samples: one forward/backward each, loss / K.

    ``loss_fn`` runs one forward pass (which draws a fresh mask) and returns the loss; gradients
    accumulate in ``.grad``. Returns the mean loss, detached.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    total: Tensor | None = None
    for _ in range(num_samples):
        loss = loss_fn() / num_samples
        loss.backward()
        total = loss.detach() if total is None else total + loss.detach()  # stays on device
    assert total is not None
    return total


class ProbMask(MaskedModel):
    """Probabilistic masking of a model's weights under one global sparsity budget, or N:M.

    Args (besides those of :class:`~probmask.masked.MaskedModel`: ``model``, ``sparsity``,
    ``module_types``, ``include``, ``exclude``, ``floor``, ``freeze_weights``, ``granularity``):
        granularity: ``ELEMENT`` (default: one global budget) or ``NM(n, m)``: N of every M consecutive
            input weights, e.g. ``ProbMask(model, granularity=NM(2, 4))`` (the sparsity is ``1 - N/M``;
            each group's relaxed budget follows ``M * keep_ratio``, at least N; see :mod:`probmask.nm`).
        score_init: initial keep-probability. At exactly 1 a score still gets its true gradient,
            because the relaxation's derivative is computed in a form that does not round to 0.
        budget: keep-ratio schedule (default: the paper's cubic schedule to ``1 - sparsity``).
        temperature: inverse-temperature schedule (default: the paper's, 1 -> 33).
        fix: how :meth:`fix_mask` fixes the mask when not told: ``"topk"`` or ``"sample"``.
        fix_samples: N for ``"sample"``.
        check_finite: raise on NaN/inf weights at projection time (one extra reduction per step).

    Whether the fused kernels run (:mod:`probmask.kernels`) is decided when it is created, from
    :func:`probmask.kernels.settings`.
    """

    learns_group_budgets = True

    def __init__(
        self,
        model: nn.Module,
        sparsity: float | None = None,
        *,
        module_types: Sequence[type[nn.Module]] = DEFAULT_MODULE_TYPES,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        floor: FloorSpec = "auto",
        freeze_weights: bool = False,
        score_init: float = 1.0,
        budget: CubicBudget | None = None,
        temperature: TemperatureSchedule | None = None,
        fix: str = "topk",
        fix_samples: int = 10,
        check_finite: bool = True,
        granularity: Granularity = ELEMENT,
    ) -> None:
        if not 0.0 <= score_init <= 1.0:
            raise ValueError(f"score_init is a probability and must lie in [0, 1], got {score_init}")
        if granularity != ELEMENT and not isinstance(granularity, NM):
            raise ValueError(f"ProbMask learns one score per weight: granularity ELEMENT or NM(n, m), not {granularity}")
        _check_fix(fix, fix_samples)
        super().__init__(model, sparsity, module_types=module_types, include=include, exclude=exclude,
                         floor=floor, freeze_weights=freeze_weights, granularity=granularity)
        self._nm = granularity if isinstance(granularity, NM) else None
        self.budget_schedule = budget or CubicBudget(1.0 - self.sparsity)
        self.temperature_schedule = temperature or TemperatureSchedule()
        self.fix, self.fix_samples = fix, fix_samples
        self.check_finite = check_finite
        setting = kernels.settings()
        self._fused = setting.fused and kernels.available(self.device.type)
        self._search = setting.search
        self.scores = torch.full((self.total,), float(score_init), device=self.device, requires_grad=True)
        self._buffer: Tensor | None = None  # scratch of the PyTorch way, see _workspace
        self._threshold = 0.0  # last projection's shift: warm start for the next
        self._projected_binding = [False] * len(self.targets)
        self._forced_mode: MaskMode | None = None
        self._in_forward = False
        self._cache: dict[int, Tensor] = {}  # this forward pass's masked weights
        self.budget = float(self.total)  # kept-element budget for the current epoch
        self.temperature = 1.0
        self._hooks += [
            model.register_forward_pre_hook(self._begin_forward),
            model.register_forward_hook(self._end_forward, always_call=True),
        ]
        log.info("ProbMask: %d prunable tensors, %d weights, keeping %d (sparsity %.4f)",
                 len(self.targets), self.total, self.target_kept, self.sparsity)

    def _initial_mask(self) -> Tensor | None:
        return None  # the keep-probabilities are the mask until it is fixed

    def _original(self, index: int) -> nn.Parameter:
        module, target = self._modules[index], self.targets[index]
        return module.parametrizations[target.param_name].original  # type: ignore[index]

    # ------------------------------------------------------------------ modes and masks
    @property
    def mode(self) -> MaskMode:
        """FIXED after fix_mask; otherwise RELAXED in model.train() and SAMPLED in model.eval()."""
        if self._forced_mode is not None:
            return self._forced_mode
        if self._fixed:
            return MaskMode.FIXED
        return MaskMode.RELAXED if self.model.training else MaskMode.SAMPLED

    @contextlib.contextmanager
    def use_mode(self, mode: MaskMode) -> Iterator[None]:
        """Temporarily force a mask mode (e.g. SAMPLED masks while the model is in train mode)."""
        if mode is MaskMode.FIXED and not self._fixed:
            raise ValueError("no fixed mask yet: call fix_mask() first")
        previous, self._forced_mode = self._forced_mode, mode
        try:
            yield
        finally:
            self._forced_mode = previous

    def _begin_forward(self, module: nn.Module, args: Any) -> None:
        first = self._original(0)
        if self.scores.device != first.device:
            raise RuntimeError(
                f"the scores are on {self.scores.device} but the weights on {first.device}: "
                "move the model before creating ProbMask"
            )
        self._cache.clear()
        self._in_forward = True
        if self.mode is MaskMode.RELAXED:  # sample every layer's mask now, in a few flat passes
            weights = [self._original(i) for i in range(len(self.targets))]
            fused = self._fused and kernels.takes(self.scores, *weights)
            work = None if fused else self._workspace()
            outs = sample_masked_weights(self.scores, weights, self.temperature, work, fused=fused)
            self._cache.update(enumerate(outs))

    def _end_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        self._cache.clear()  # the autograd graph keeps what backward needs
        self._in_forward = False

    def _workspace(self) -> Tensor:
        """One kept scratch tensor shaped like the scores, for the full-size temporaries of the
        PyTorch way (the masks' and the projection's never run at the same time); the fused
        kernels need none."""
        if self._buffer is None or self._buffer.device != self.scores.device:
            self._buffer = torch.empty_like(self.scores, requires_grad=False)
        return self._buffer

    def _masked_weight(self, index: int, weight: Tensor) -> Tensor:
        cached = self._cache.get(index)
        if cached is not None:  # one mask sample per forward pass, however often it is read
            return cached
        score = self.layout.view(self.scores, index)
        mode = self.mode
        if mode is MaskMode.RELAXED:
            out = relaxed_masked_weight(weight, score, self.temperature)  # read outside model.forward
        elif mode is MaskMode.SAMPLED:
            keep = torch.rand_like(score, dtype=torch.float32).lt_(score.detach())  # 1.0 / 0.0
            out = keep.mul_(weight) if keep.dtype == weight.dtype else weight * keep.to(weight.dtype)
        else:
            out = super()._masked_weight(index, weight)
        if self._in_forward:
            self._cache[index] = out
        return out

    # ------------------------------------------------------------------ training
    def score_parameters(self) -> list[Tensor]:
        """The keep-probabilities: one flat tensor (train it with Adam, no weight decay)."""
        return [self.scores]

    def set_epoch(self, epoch: float, num_epochs: float) -> None:
        """Move the budget and temperature schedules to ``epoch`` of ``num_epochs``."""
        super().set_epoch(epoch, num_epochs)
        keep = self.budget_schedule(self.epoch, self.num_epochs)
        self.budget = max(keep * self.total, float(self.target_kept))
        self.temperature = self.temperature_schedule(self.epoch, self.num_epochs)

    def passes(self, samples: int) -> int:
        """K relaxed samples per minibatch; once the mask is fixed every sample is the same: one."""
        return 1 if self._fixed else samples

    def step(self) -> None:
        """After every optimizer step: :meth:`project`."""
        self.project()

    @torch.no_grad()
    def project(self) -> None:
        """Project all scores onto {0 <= s <= 1, sum s <= budget, layer sums >= floors}; under N:M every
        group of M onto {0 <= s <= 1, sum s <= budget * M / total} (the fused kernels do not apply).

        Call after every optimizer step of the scores. Does nothing once the mask is fixed.
        """
        self._require_live()
        if self._fixed:
            return
        if self.check_finite:
            _check_finite([t.name for t in self.targets], [self._original(i) for i in range(len(self.targets))])
        if self._nm is not None:
            project_groups_(self.scores, self.budget * self._nm.m / self.total, self._nm.m)
            return
        fused = self._fused and kernels.takes(self.scores)
        result = project_(
            self.scores, self.budget, sizes=self.layout.sizes, floors=self.floors if any(self.floors) else None,
            start=self._threshold, buffer=None if fused else self._workspace(), fused=fused, search=self._search,
        )
        self._threshold = result.threshold
        self._projected_binding = result.floor_binding.tolist()

    def stats(self) -> dict[str, float]:
        """``density`` (the expected kept fraction before fixing), ``budget`` (keep ratio) and
        ``temperature``."""
        density = super().stats()["density"] if self._fixed else float(self.scores.detach().sum()) / self.total
        return {"density": density, "budget": self.budget / self.total, "temperature": self.temperature}

    # ------------------------------------------------------------------ fixing
    @torch.no_grad()
    def fix_mask(
        self,
        method: str | None = None,
        *,
        num_samples: int | None = None,
        score_fn: Callable[[], float] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Fix one binary mask with at most ``target_kept`` ones and every floor honoured.

        ``"topk"`` keeps the highest scores (exactly ``target_kept``; under N:M the N highest of
        every group). ``"sample"`` draws ``num_samples`` Bernoulli masks, repairs each to the
        budget (see :mod:`probmask.fixing`; under N:M to exactly N per group) and keeps the one
        for which ``score_fn()`` (run with that mask in place) is highest. Without arguments, the
        ``fix`` and ``fix_samples`` given at creation. The scores stop training afterwards. Returns
        the flat bool mask.
        """
        self._require_live()
        method = self.fix if method is None else method
        num_samples = self.fix_samples if num_samples is None else num_samples
        return self._fix(self._choose(method, num_samples, score_fn, generator))

    def _final_mask(self, score_fn: Callable[[], float] | None, generator: torch.Generator | None) -> Tensor:
        return self._choose(self.fix, self.fix_samples, score_fn, generator)

    def _choose(self, method: str, num_samples: int, score_fn: Callable[[], float] | None,
                generator: torch.Generator | None) -> Tensor:
        _check_fix(method, num_samples)
        if method == "sample" and num_samples > 1 and score_fn is None:
            raise ValueError("fix_mask('sample', num_samples > 1) needs score_fn to pick the best")
        scores, nm, args = self.scores.detach(), self._nm, (self.target_kept, self.layout.sizes, self.floors)
        if method == "topk":
            return topk_mask(scores, *args) if nm is None else topn_mask(scores, nm.n, nm.m)
        draw = ((lambda: sample_mask(scores, *args, generator=generator)) if nm is None
                else (lambda: sample_nm_mask(scores, nm.n, nm.m, generator)))
        return _best_sample(self, draw, num_samples, score_fn)

    # ------------------------------------------------------------------ reporting and state
    def _kept(self) -> list[float]:
        if self._fixed:
            return super()._kept()
        return [float(s.sum()) for s in self.scores.detach().clamp(0, 1).split(self.layout.sizes)]

    def _floor_binding(self, kept: list[float]) -> list[bool]:
        return super()._floor_binding(kept) if self._fixed else list(self._projected_binding)

    def state_dict(self) -> dict[str, Any]:
        """Scores, schedule position, the projection's warm start and the fixed mask: all needed to resume."""
        return {**super().state_dict(), "scores": self.scores.detach().clone(), "threshold": self._threshold,
                "floor_binding": list(self._projected_binding)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.set_epoch(self.epoch, self.num_epochs)  # the schedules' budget and temperature
        self.scores.copy_(state["scores"])
        self._threshold = float(state["threshold"])
        self._projected_binding = [bool(b) for b in state["floor_binding"]]


def _best_sample(pm: ProbMask, draw: Callable[[], Tensor], num_samples: int,
                 score_fn: Callable[[], float] | None) -> Tensor:
    """The best of ``num_samples`` masks from ``draw()`` by ``score_fn()``, run with each in place
    (the first one without ``score_fn``)."""
    best, best_value = None, -math.inf
    for i in range(num_samples):
        candidate = draw()
        if score_fn is None:
            return candidate
        pm.mask, pm._fixed = candidate, True  # in place while score_fn runs
        try:
            value = float(score_fn())
        finally:
            pm.mask, pm._fixed = None, False
        log.info("fix_mask: sample %d/%d scored %.4f", i + 1, num_samples, value)
        if value > best_value:
            best, best_value = candidate, value
    assert best is not None
    return best


def _check_finite(names: list[str], weights: list[Tensor]) -> None:
    """Raise on NaN or inf in any of the weights (one reduction each, one host synchronisation)."""
    totals = torch.stack([w.detach().float().sum() for w in weights])
    if not bool(torch.isfinite(totals).all()):
        bad = [n for n, ok in zip(names, torch.isfinite(totals).tolist()) if not ok]
        raise ValueError(f"NaN or inf in the weights {bad[:4]}: lower the learning rate or clip gradients")


def _check_fix(method: str, num_samples: int) -> None:
    if method not in _FIX_METHODS:
        raise ValueError(f"unknown fix_mask method {method!r}: use 'topk' or 'sample'")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
