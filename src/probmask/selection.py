"""Which parameters of a model are prunable.

By default the ``weight`` of every ``nn.Linear``, ``nn.Conv1d/2d/3d`` and
``nn.ConvTranspose1d/2d/3d``; biases and normalisation layers stay dense. ``include`` opts in
other parameters by name pattern (``fnmatch`` style, e.g. ``"*.in_proj_weight"``,
``"lstm.weight_hh_l*"``, ``"embed.weight"``); ``exclude`` removes parameters by name pattern
(e.g. keep the first conv and the classifier dense).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

__all__ = ["DEFAULT_MODULE_TYPES", "Target", "select_targets"]

DEFAULT_MODULE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


@dataclass(frozen=True)
class Target:
    """One prunable parameter: its full name and where it lives."""

    name: str  # full parameter name as in model.named_parameters(), e.g. "fc1.weight"
    module_name: str
    param_name: str  # attribute name on the module, e.g. "weight" or "weight_hh_l0"


def _as_patterns(patterns: str | Iterable[str] | None) -> list[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [patterns]
    return list(patterns)


def select_targets(
    model: nn.Module,
    module_types: Sequence[type[nn.Module]] = DEFAULT_MODULE_TYPES,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> list[Target]:
    """List the prunable parameters of ``model`` in ``named_modules`` order.

    Raises ``ValueError`` if an include or exclude pattern matches no parameter, or if nothing
    is left to prune.
    """
    include_p, exclude_p = _as_patterns(include), _as_patterns(exclude)
    types = tuple(module_types)
    chosen: dict[str, Target] = {}
    seen_ids: set[int] = set()
    all_names: list[str] = []
    include_hits = {p: 0 for p in include_p}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            all_names.append(full)
            by_type = bool(types) and isinstance(module, types) and param_name == "weight"
            by_name = False
            for p in include_p:
                if fnmatch.fnmatchcase(full, p):
                    include_hits[p] += 1
                    by_name = True
            if (by_type or by_name) and id(param) not in seen_ids:
                seen_ids.add(id(param))
                chosen[full] = Target(full, module_name, param_name)
    missing = [p for p, hits in include_hits.items() if hits == 0]
    if missing:
        raise ValueError(
            f"include pattern(s) {missing} match no parameter of the model; parameter names look "
            f"like {all_names[:5]} (see model.named_parameters())"
        )
    for p in exclude_p:
        hits = [name for name in chosen if fnmatch.fnmatchcase(name, p)]
        if not hits:
            raise ValueError(
                f"exclude pattern {p!r} matches no prunable parameter; prunable ones are "
                f"{list(chosen)[:8]}{' ...' if len(chosen) > 8 else ''}"
            )
        for name in hits:
            del chosen[name]
    if not chosen:
        raise ValueError(
            "the model has no prunable weights: it has no nn.Linear / nn.Conv* / "
            "nn.ConvTranspose* layers left after exclusions; opt parameters in with "
            "include=['name.pattern']"
        )
    return list(chosen.values())
