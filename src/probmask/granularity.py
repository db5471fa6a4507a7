"""What one mask element stands for: one weight, or a group of weights that is kept or removed
together (a whole output channel, ...).

A granularity maps a weight's shape to the shape of its mask and applies the mask to the weight.
The mask shape broadcasts against the weight, so applying it is one multiplication and a group
costs nothing to expand. :class:`probmask.MaskedModel` lays every prunable weight's mask elements
out back to back in one flat vector; a method sees only mask elements and their layers.

A granularity also says which budget its mask elements are counted against: the default is the
global one (``floor((1 - sparsity) * n)`` elements and per-layer floors, :mod:`probmask.budget`);
:class:`probmask.NM` (:mod:`probmask.nm`) replaces it by N kept of every M consecutive weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from torch import Tensor

from probmask.budget import FloorSpec, check_sparsity, kept_count, resolve_floors

__all__ = ["ELEMENT", "OUTPUT_CHANNEL", "Granularity", "Layout"]


@dataclass(frozen=True)
class Granularity:
    """A mask element per weight (``"element"``) or per output unit: the first dimension of the
    weight, i.e. a Linear layer's row or a convolution's output channel (``"output_channel"``)."""

    name: str

    def __post_init__(self) -> None:
        if self.name not in ("element", "output_channel"):
            raise ValueError(f"granularity must be 'element' or 'output_channel', got {self.name!r}")

    def mask_shape(self, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The mask's shape for a weight of ``weight_shape`` (it broadcasts against the weight)."""
        if self.name == "element" or len(weight_shape) == 0:
            return tuple(weight_shape)
        return (weight_shape[0],) + (1,) * (len(weight_shape) - 1)

    def apply(self, weight: Tensor, mask: Tensor) -> Tensor:
        """``weight`` with the mask (shaped by :meth:`mask_shape`, any dtype) applied."""
        return weight * mask.to(weight.dtype)

    # The budget hooks, called by probmask.MaskedModel in this order.
    per_group_budget = False  # True where each group of elements has its own budget (N:M)

    def check(self, names: Sequence[str], weight_shapes: Sequence[tuple[int, ...]], modules: Sequence[Any]) -> None:
        """Refuse prunable weights (named, shaped, in these modules) this granularity cannot mask."""

    def resolve_sparsity(self, sparsity: Any) -> float:
        """The sparsity asked for, checked (see :func:`probmask.budget.check_sparsity`)."""
        if sparsity is None:
            raise ValueError("sparsity is required: the fraction of weights removed, e.g. sparsity=0.9")
        return check_sparsity(sparsity)

    def kept(self, sparsity: float, total: int) -> int:
        """The exact number of the ``total`` mask elements kept at the end."""
        return kept_count(sparsity, total)

    def floors(self, floor: FloorSpec, layout: Layout, kept: int, sparsity: float) -> list[int]:
        """Per-layer minimum kept counts (see :func:`probmask.budget.resolve_floors`)."""
        return resolve_floors(floor, layout.rows, layout.sizes, kept, sparsity)


ELEMENT = Granularity("element")
OUTPUT_CHANNEL = Granularity("output_channel")


@dataclass(frozen=True)
class Layout:
    """The flat mask vector of a model: each prunable weight's mask elements back to back."""

    names: tuple[str, ...]  # parameter names, in order
    weight_shapes: tuple[tuple[int, ...], ...]
    mask_shapes: tuple[tuple[int, ...], ...]
    granularity: Granularity

    @classmethod
    def of(cls, names: list[str], weight_shapes: list[tuple[int, ...]], granularity: Granularity) -> Layout:
        empty = [n for n, s in zip(names, weight_shapes) if math.prod(s) == 0]
        if empty:
            raise ValueError(f"the prunable parameters {empty} have no elements: exclude them (exclude=[...])")
        masks = tuple(granularity.mask_shape(tuple(s)) for s in weight_shapes)
        return cls(tuple(names), tuple(tuple(s) for s in weight_shapes), masks, granularity)

    @cached_property
    def sizes(self) -> list[int]:
        """Mask elements per layer."""
        return [math.prod(s) for s in self.mask_shapes]

    @cached_property
    def weights_per_element(self) -> list[int]:
        """How many weights one mask element of each layer stands for."""
        return [math.prod(w) // math.prod(m) for w, m in zip(self.weight_shapes, self.mask_shapes)]

    @cached_property
    def total(self) -> int:
        return sum(self.sizes)

    @cached_property
    def offsets(self) -> list[int]:
        out, start = [], 0
        for size in self.sizes:
            out.append(start)
            start += size
        return out

    @cached_property
    def rows(self) -> list[int]:
        """Output units per layer (the first dimension of each weight), for the default floors."""
        return [s[0] if len(s) > 0 else 1 for s in self.weight_shapes]

    def views(self, flat: Tensor) -> list[Tensor]:
        """Per-layer views of a flat vector, each shaped like that layer's mask."""
        return [part.view(shape) for part, shape in zip(flat.split(self.sizes), self.mask_shapes)]

    def view(self, flat: Tensor, index: int) -> Tensor:
        """Layer ``index``'s view of a flat vector, shaped like its mask."""
        start = self.offsets[index]
        return flat[start : start + self.sizes[index]].view(self.mask_shapes[index])

    def expand(self, flat: Tensor, index: int) -> Tensor:
        """Layer ``index``'s part of a flat mask, expanded to its weight's shape."""
        return self.view(flat, index).expand(self.weight_shapes[index])
