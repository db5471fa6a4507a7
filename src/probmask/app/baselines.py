"""The baseline methods, each a :class:`~probmask.MaskedModel` that says only how its mask is chosen
and when (the budget, floors, parametrizations, fixing and finalizing are the base's):

* :class:`Dense` -- no pruning: the accuracy ceiling (``prune.sparsity`` is ignored).
* :class:`Magnitude` -- magnitude pruning with one global threshold over all prunable layers or
  one rate per layer: gradually along ProbMask's cubic budget (``gmp``, ``gmp_uniform``; Zhu &
  Gupta 2017), the mask updated every ``interval`` optimizer steps and pruned weights never coming
  back, or in one cut at the end of the main phase (``oneshot``).
* :class:`RandomMask` -- a random mask at the target rate in every layer, drawn once, before training.
* :class:`EdgePopup` -- supermasks (Ramanujan et al. 2020): frozen random weights, a score per
  weight trained by Adam, and every forward pass keeps the top-k scores of each layer (one rate in
  every layer) with the straight-through gradient ``dL/ds = dL/dw_eff * w``.

Every method ends with exactly ``floor((1 - sparsity) * n)`` kept elements (:class:`Dense`: all).
The global ones honour the per-layer floors; the uniform ones keep one rate in every layer by
definition: the per-layer counts are that rate rounded by largest remainders so that they add up
to the target exactly, with at least one element per layer (floors do not apply to them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from probmask.fixing import topk_mask
from probmask.masked import MaskedModel
from probmask.schedules import CubicBudget

__all__ = ["Dense", "EdgePopup", "Magnitude", "RandomMask", "uniform_counts"]


def uniform_counts(sizes: Sequence[int], k: int) -> list[int]:
    """Split ``k`` kept elements over layers of ``sizes`` at one rate: largest-remainder rounding of
    ``k * n_l / n``, at least 1 and at most ``n_l`` per layer, adding up to ``k`` exactly."""
    total = sum(sizes)
    if not len(sizes) <= k <= total:
        raise ValueError(f"cannot keep {k} of {total} weights with at least one in each of {len(sizes)} layers: "
                         "lower the sparsity")
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


def uniform_mask(values: Tensor, sizes: Sequence[int], k: int) -> Tensor:
    """The largest ``values`` of every layer, one rate for all layers (see :func:`uniform_counts`)."""
    mask = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    for part, m, count in zip(values.split(list(sizes)), mask.split(list(sizes)), uniform_counts(sizes, k)):
        # topk, not a full sort: edgepopup does this every step (42 ms against 1-4 ms for a 235k layer)
        m[torch.topk(part, count, sorted=False).indices] = True
    return mask


class Dense(MaskedModel):
    """No pruning: the same training (main phase and finetuning) with every weight kept."""

    def __init__(self, model: nn.Module, sparsity: float, **kwargs: Any) -> None:
        super().__init__(model, sparsity, **kwargs)
        self.target_kept = self.total

    def _final_mask(self, score_fn: Callable[[], float] | None, generator: torch.Generator | None) -> Tensor:
        return self.mask


class Magnitude(MaskedModel):
    """Magnitude pruning: the largest ``|w|`` (for a group: its L2 norm) over all layers
    (``uniform=False``, honouring the floors) or within each layer at one rate (``uniform=True``).

    ``schedule``: prune gradually along this keep-ratio schedule, evaluated at the fractional epoch
    every ``interval`` optimizer steps (the steps per epoch are learnt from the first epoch);
    ``None``: keep everything until the mask is fixed, then cut once.
    """

    def __init__(self, model: nn.Module, sparsity: float, *, uniform: bool = False,
                 schedule: CubicBudget | None = None, interval: int = 10, **kwargs: Any) -> None:
        if interval < 1:
            raise ValueError(f"the mask interval must be at least 1 step, got {interval}")
        super().__init__(model, sparsity, **kwargs)
        if uniform:
            uniform_counts(self.layout.sizes, self.target_kept)  # refuse a budget below one per layer now
        self.uniform, self.schedule, self.interval = uniform, schedule, interval
        self.keep_ratio = 1.0
        self.steps = 0  # optimizer steps of the main phase so far
        self.epoch_first_step = 0
        self.steps_per_epoch = 0  # learnt from the first epoch; 0 until then

    def _magnitudes(self) -> Tensor:
        """Per mask element: |w * mask| of its weight, or the L2 norm of its group's."""
        out = []
        for i, (module, target) in enumerate(zip(self._modules, self.targets)):
            weight = module.parametrizations[target.param_name].original.detach()  # type: ignore[index]
            masked = self._masked_weight(i, weight).float().abs()
            dims = [d for d, (m, w) in enumerate(zip(self.layout.mask_shapes[i], weight.shape)) if m == 1 and w > 1]
            out.append((masked if not dims else masked.square().sum(dims, keepdim=True).sqrt()).flatten())
        return torch.cat(out)

    def _mask_for(self, k: int) -> Tensor:
        values = self._magnitudes()
        if self.uniform:
            return uniform_mask(values, self.layout.sizes, k)
        return topk_mask(values, k, self.layout.sizes, self.floors)

    @torch.no_grad()
    def _update(self) -> None:
        """Prune to the budget of the current (fractional) epoch."""
        if self.schedule is None or self._fixed:
            return
        progress = self.epoch
        if self.steps_per_epoch:
            progress += min(1.0, (self.steps - self.epoch_first_step) / self.steps_per_epoch)
        self.keep_ratio = self.schedule(progress, self.num_epochs)
        k = max(self.target_kept, int(math.floor(self.keep_ratio * self.total + 1e-6)))
        if k < int(self.mask.sum()):
            self.mask = self._mask_for(k)

    def set_epoch(self, epoch: float, num_epochs: float) -> None:
        if self.steps > self.epoch_first_step and not self.steps_per_epoch:
            self.steps_per_epoch = self.steps - self.epoch_first_step
        super().set_epoch(epoch, num_epochs)
        self.epoch_first_step = self.steps
        self._update()

    def step(self) -> None:
        if self._fixed:
            return
        self.steps += 1
        if self.steps % self.interval == 0:
            self._update()

    def stats(self) -> dict[str, float]:
        return {**super().stats(), "budget": self.keep_ratio} if self.schedule is not None else super().stats()

    def _final_mask(self, score_fn: Callable[[], float] | None, generator: torch.Generator | None) -> Tensor:
        return self._mask_for(self.target_kept)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "keep_ratio": self.keep_ratio, "steps": self.steps,
                "epoch_first_step": self.epoch_first_step, "steps_per_epoch": self.steps_per_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for key in ("steps", "epoch_first_step", "steps_per_epoch"):
            setattr(self, key, int(state[key]))
        self.keep_ratio = float(state["keep_ratio"])


class RandomMask(MaskedModel):
    """A random mask at the target rate in every layer, drawn from the global generator when it is
    created and kept for the whole training."""

    def __init__(self, model: nn.Module, sparsity: float, **kwargs: Any) -> None:
        super().__init__(model, sparsity, **kwargs)
        self.mask = uniform_mask(torch.rand(self.total).to(self.device), self.layout.sizes, self.target_kept)

    def _final_mask(self, score_fn: Callable[[], float] | None, generator: torch.Generator | None) -> Tensor:
        return self.mask


class EdgePopup(MaskedModel):
    """Edge-popup supermasks: frozen random weights, per-layer top-k of trained scores."""

    def __init__(self, model: nn.Module, sparsity: float, **kwargs: Any) -> None:
        super().__init__(model, sparsity, freeze_weights=True, **kwargs)
        # scores of the same scale as ProbMask's probabilities, so the shared score lr suits both
        self.scores = torch.rand(self.total, device=self.device).requires_grad_(True)
        self.mask = uniform_mask(self.scores.detach(), self.layout.sizes, self.target_kept)

    def _masked_weight(self, index: int, weight: Tensor) -> Tensor:
        """The hard top-k mask; before fixing, with the straight-through score gradient."""
        hard = self.layout.view(self.mask, index)
        if self._fixed or not torch.is_grad_enabled():
            return self.layout.granularity.apply(weight, hard)
        scores = self.layout.view(self.scores, index)
        return self.layout.granularity.apply(weight, hard + (scores - scores.detach()))

    def score_parameters(self) -> list[Tensor]:
        return [self.scores]

    @torch.no_grad()
    def step(self) -> None:
        if not self._fixed:  # the top-k of the updated scores is the next forward's mask
            self.mask = uniform_mask(self.scores.detach(), self.layout.sizes, self.target_kept)

    def _final_mask(self, score_fn: Callable[[], float] | None, generator: torch.Generator | None) -> Tensor:
        return uniform_mask(self.scores.detach(), self.layout.sizes, self.target_kept)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "scores": self.scores.detach().clone()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.scores.copy_(state["scores"])
