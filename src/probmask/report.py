"""Per-layer sparsity report: what was kept where, and whether a floor held a layer up.

A report may also carry each layer's *role* (e.g. "attention out", "MLP": ``Report.with_roles``);
then its table, its dict and :meth:`Report.role_groups` group the layers by role, with totals.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import Tensor

__all__ = ["LayerReport", "Report", "RoleReport"]


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
class RoleReport:
    """The layers of one role together."""

    role: str
    layers: list[str]  # their names, in the report's order
    numel: int
    kept: float

    @property
    def density(self) -> float:
        return self.kept / self.numel if self.numel else 0.0

    def summary(self) -> dict:
        """``{role, layers, numel, kept, density}``."""
        kept = int(self.kept) if float(self.kept).is_integer() else self.kept
        return {"role": self.role, "layers": list(self.layers), "numel": self.numel, "kept": kept,
                "density": self.density}


@dataclass(frozen=True)
class Report:
    layers: list[LayerReport]
    fixed: bool  # True: counts of a fixed mask; False: expected counts from the scores
    target_kept: int  # the budget k of the final mask
    extra: dict[str, float] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)  # layer name -> role; empty: no grouping

    def with_roles(self, roles: Mapping[str, str]) -> Report:
        """This report with a role for every layer (``{layer name: role}``); a layer without one is
        a ``ValueError``. An empty mapping gives a report without roles."""
        missing = [layer.name for layer in self.layers if layer.name not in roles]
        if roles and missing:
            raise ValueError(f"roles name no role for layer(s) {missing[:3]}: give every layer a role")
        return replace(self, roles={layer.name: str(roles[layer.name]) for layer in self.layers} if roles else {})

    def role_groups(self) -> list[RoleReport]:
        """The layers grouped by role, roles in the order of their first layer; empty without roles."""
        groups: dict[str, list[LayerReport]] = {}
        for layer in self.layers:
            if self.roles:
                groups.setdefault(self.roles[layer.name], []).append(layer)
        return [RoleReport(role, [layer.name for layer in group], sum(layer.numel for layer in group),
                           sum(layer.kept for layer in group)) for role, group in groups.items()]

    def summaries(self) -> list[dict]:
        """:meth:`LayerReport.summary` of every layer, with its ``role`` when the report has roles."""
        return [{**layer.summary(), "role": self.roles[layer.name]} if self.roles else layer.summary()
                for layer in self.layers]

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
            if self.roles:
                d["role"] = self.roles[layer.name]
            layers.append(d)
        out = {
            "fixed": self.fixed,
            "total": self.total,
            "kept": self.kept,
            "target_kept": self.target_kept,
            "density": self.density,
            "sparsity": self.sparsity,
            "layers": layers,
        }
        if self.roles:
            out["roles"] = [group.summary() for group in self.role_groups()]
        return out

    def format(self) -> str:
        """A fixed-width table, one row per layer, then the totals. With roles the layers are
        grouped under their role, each group closed by a row of its totals."""
        what = "kept" if self.fixed else "kept (expected)"
        indent = "  " if self.roles else ""
        names = [indent + layer.name for layer in self.layers] + [f"{g.role} total" for g in self.role_groups()]
        name_w = max([len("layer")] + [len(n) for n in names])
        shape_w = max([len("shape")] + [len(str(tuple(layer.shape))) for layer in self.layers])
        head = f"{'layer':<{name_w}}  {'shape':<{shape_w}}  {'numel':>10}  {what:>15}  {'density':>8}  floor"
        rows = [head, "-" * len(head)]

        def count(kept: float) -> str:
            return f"{kept:.0f}" if self.fixed else f"{kept:.1f}"

        def layer_row(layer: LayerReport) -> str:
            mark = f"{layer.floor}{' (binding)' if layer.floor_binding else ''}"
            return (f"{indent + layer.name:<{name_w}}  {str(tuple(layer.shape)):<{shape_w}}  {layer.numel:>10}  "
                    f"{count(layer.kept):>15}  {layer.density:>8.2%}  {mark}")

        if self.roles:
            by_name = {layer.name: layer for layer in self.layers}
            for group in self.role_groups():
                rows.append(f"{group.role} ({len(group.layers)} layer{'s' if len(group.layers) > 1 else ''})")
                rows.extend(layer_row(by_name[name]) for name in group.layers)
                rows.append(f"{group.role + ' total':<{name_w}}  {'':<{shape_w}}  {group.numel:>10}  "
                            f"{count(group.kept):>15}  {group.density:>8.2%}")
        else:
            rows.extend(layer_row(layer) for layer in self.layers)
        rows.append("-" * len(head))
        rows.append(
            f"{'total':<{name_w}}  {'':<{shape_w}}  {self.total:>10}  {count(self.kept):>15}  "
            f"{self.density:>8.2%}  sparsity {self.sparsity:.2%} (budget {self.target_kept})"
        )
        if any(layer.floor_binding for layer in self.layers):
            rows.append("a floor was binding: that layer would have kept fewer weights without it")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.format()
