"""Turning keep-probabilities into one binary mask with an exact budget.

Both ways guarantee ``mask.sum() <= k`` and ``mask[layer].sum() >= floor[layer]``:

* :func:`topk_mask` keeps the ``floor_l`` highest-scored weights of every layer, then the
  highest-scored of the rest until exactly ``k`` are kept (ties broken by position).
* :func:`repair_mask` takes any sampled mask and makes it feasible with the least change: it
  adds each layer's highest-scored weights up to its floor, then, while more than ``k`` are
  kept, drops the lowest-scored kept weights outside those floors. A Bernoulli sample meets the
  budget only in expectation; after repair it meets it always.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["floor_mask", "repair_mask", "sample_mask", "topk_mask"]


def _check(scores: Tensor, k: int, sizes: Sequence[int], floors: Sequence[int]) -> None:
    if scores.dim() != 1 or sum(sizes) != scores.numel():
        raise ValueError("scores must be flat and sizes must add up to their number")
    if len(floors) != len(sizes):
        raise ValueError(f"got {len(floors)} floors for {len(sizes)} layers")
    if k < sum(floors):
        raise ValueError(f"budget k={k} is below the sum of the per-layer floors ({sum(floors)})")


def _top_positions(values: Tensor, count: int) -> Tensor:
    """Indices of the ``count`` largest values; ties go to the lower index (deterministic)."""
    if count <= 0:
        return torch.empty(0, dtype=torch.long, device=values.device)
    order = torch.sort(values, descending=True, stable=True).indices
    return order[:count]


def floor_mask(scores: Tensor, sizes: Sequence[int], floors: Sequence[int]) -> Tensor:
    """The ``floor_l`` highest-scored positions of every layer, as a flat bool mask."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    for part, m, fl in zip(scores.split(list(sizes)), mask.split(list(sizes)), floors):
        m[_top_positions(part, int(fl))] = True
    return mask


def topk_mask(scores: Tensor, k: int, sizes: Sequence[int], floors: Sequence[int]) -> Tensor:
    """Deterministic: exactly ``min(k, n)`` kept, every layer at or above its floor."""
    _check(scores, k, sizes, floors)
    mask = floor_mask(scores, sizes, floors)
    rest = min(k, scores.numel()) - int(mask.sum())
    others = scores.masked_fill(mask, float("-inf"))
    mask[_top_positions(others, rest)] = True
    return mask


def repair_mask(
    mask: Tensor, scores: Tensor, k: int, sizes: Sequence[int], floors: Sequence[int]
) -> Tensor:
    """The feasible mask closest to ``mask``: floors added, lowest-scored extras dropped."""
    _check(scores, k, sizes, floors)
    protected = floor_mask(scores, sizes, floors)
    out = mask.to(torch.bool) | protected
    excess = int(out.sum()) - k
    if excess > 0:
        candidates = out & ~protected
        keep = int(candidates.sum()) - excess
        ranked = scores.masked_fill(~candidates, float("-inf"))
        out = protected.clone()
        out[_top_positions(ranked, keep)] = True
    return out


def sample_mask(
    scores: Tensor,
    k: int,
    sizes: Sequence[int],
    floors: Sequence[int],
    generator: torch.Generator | None = None,
) -> Tensor:
    """One Bernoulli(scores) sample, repaired to the exact budget and floors."""
    probs = scores.detach().clamp(0.0, 1.0)
    draw = torch.rand(probs.shape, generator=generator, device=probs.device) < probs
    return repair_mask(draw, scores.detach(), k, sizes, floors)
