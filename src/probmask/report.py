"""Per-layer sparsity report: what was kept where, and whether a floor held a layer up."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

__all__ = ["LayerReport", "Report"]


@dataclass(frozen=True)
class LayerReport:
    name: str
    shape: tuple[int, ...]
    numel: int
    kept: float  # an exact count once the mask is fixed; the expected count (sum of scores) before
    floor: int  # the layer's minimum number of kept weights
    floor_binding: bool  # the floor decided this layer's count

    @property
    def density(self) -> float:
        return self.kept / self.numel if self.numel else 0.0

    def summary(self) -> dict:
        """``{name, shape, numel, kept, density}``: the per-layer record of results and file metadata."""
        kept = int(self.kept) if float(self.kept).is_integer() else self.kept
        return {"name": self.name, "shape": list(self.shape), "numel": self.numel, "kept": kept,
                "density": self.density}


@dataclass(frozen=True)
class Report:
    layers: list[LayerReport]
    fixed: bool  # True: counts of a fixed mask; False: expected counts from the scores
    target_kept: int  # the budget k of the final mask
    extra: dict[str, float] = field(default_factory=dict)

    @classmethod
    def count_nonzero(cls, tensors: Mapping[str, Tensor], floors: Mapping[str, int] | None = None,
                      binding: Mapping[str, bool] | None = None) -> Report:
        """A fixed report of what ``tensors`` (bool masks or finalized weights) keep: their
        nonzero entries per tensor; the target is the total kept."""
        floors, binding = floors or {}, binding or {}
        layers = [
            LayerReport(name, tuple(t.shape), t.numel(), float(torch.count_nonzero(t.detach())), floors.get(name, 0),
                        binding.get(name, False))
            for name, t in tensors.items()
        ]
        return cls(layers, fixed=True, target_kept=int(sum(layer.kept for layer in layers)))

    @property
    def total(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def kept(self) -> float:
        return sum(layer.kept for layer in self.layers)

    @property
    def density(self) -> float:
        return self.kept / self.total if self.total else 0.0

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    def to_dict(self) -> dict:
        """JSON-ready: totals plus a list of ``{name, shape, numel, kept, density, ...}``."""
        layers = []
        for layer in self.layers:
            d = asdict(layer)
            d["shape"] = list(layer.shape)
            d["density"] = layer.density
            layers.append(d)
        return {
            "fixed": self.fixed,
            "total": self.total,
            "kept": self.kept,
            "target_kept": self.target_kept,
            "density": self.density,
            "sparsity": self.sparsity,
            "layers": layers,
        }

    def format(self) -> str:
        """A fixed-width table, one row per layer, then the totals."""
        what = "kept" if self.fixed else "kept (expected)"
        name_w = max([len("layer")] + [len(layer.name) for layer in self.layers])
        shape_w = max([len("shape")] + [len(str(tuple(layer.shape))) for layer in self.layers])
        head = f"{'layer':<{name_w}}  {'shape':<{shape_w}}  {'numel':>10}  {what:>15}  {'density':>8}  floor"
        rows = [head, "-" * len(head)]
        for layer in self.layers:
            kept = f"{layer.kept:.0f}" if self.fixed else f"{layer.kept:.1f}"
            mark = f"{layer.floor}{' (binding)' if layer.floor_binding else ''}"
            rows.append(
                f"{layer.name:<{name_w}}  {str(tuple(layer.shape)):<{shape_w}}  {layer.numel:>10}  "
                f"{kept:>15}  {layer.density:>8.2%}  {mark}"
            )
        rows.append("-" * len(head))
        total_kept = f"{self.kept:.0f}" if self.fixed else f"{self.kept:.1f}"
        rows.append(
            f"{'total':<{name_w}}  {'':<{shape_w}}  {self.total:>10}  {total_kept:>15}  "
            f"{self.density:>8.2%}  sparsity {self.sparsity:.2%} (budget {self.target_kept})"
        )
        if any(layer.floor_binding for layer in self.layers):
            rows.append("a floor was binding: that layer would have kept fewer weights without it")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.format()
