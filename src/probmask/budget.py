"""The global budget: the sparsity a user asks for, the exact number of mask elements it keeps,
and the per-layer floors that keep every layer alive under it.

Every method (ProbMask and the baselines alike) takes its numbers from here, so that they all
end with the same count ``floor((1 - sparsity) * n)``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

__all__ = ["FloorSpec", "check_sparsity", "kept_count", "resolve_floors"]

FloorSpec = str | int | float | None


def check_sparsity(sparsity: Any) -> float:
    """``sparsity`` as a float in (0, 1): the fraction of prunable weights removed.

    Any real number works (a Python or NumPy scalar, a 0-d tensor); booleans, strings, NaN and
    values outside (0, 1) raise ``ValueError`` naming the value and its type.
    """
    value = _real(sparsity)
    if value is None or not 0.0 < value < 1.0:
        raise ValueError(
            f"sparsity is the fraction of weights removed and must lie in (0, 1), got {sparsity!r} "
            f"({type(sparsity).__name__}; e.g. 0.99 keeps 1%)"
        )
    return value


def _real(x: Any) -> float | None:
    """``float(x)`` for a real number of any numeric type (not a bool), else None."""
    if isinstance(x, bool) or isinstance(x, (str, bytes)):
        return None
    if isinstance(x, numbers.Real):
        return float(x)
    if getattr(x, "shape", None) == () and hasattr(x, "item"):  # a 0-d tensor or array
        item = x.item()
        return None if isinstance(item, bool) or not isinstance(item, numbers.Real) else float(item)
    return None


def kept_count(sparsity: float, total: int) -> int:
    """The exact number of the ``total`` elements kept at ``sparsity``: ``floor((1 - s) * n)``,
    without losing one to rounding (``(1 - 0.9) * 266200`` is ``26619.999999999993`` in floating point)."""
    return int(math.floor((1.0 - sparsity) * total + 1e-6))


def resolve_floors(
    floor: FloorSpec, rows: Sequence[int], sizes: Sequence[int], target_kept: int, sparsity: float
) -> list[int]:
    """Per-layer minimum kept counts for a ``floor`` setting; ``rows`` are the layers' output
    units, ``sizes`` their numbers of mask elements.

    ``"auto"``: one per output unit, scaled down proportionally (never below 1) if that would take
    more than half of the budget; ``"unit"``: one per output unit, strictly; a positive ``int``:
    that many per layer; a ``float`` in (0, 1): that fraction of each layer; ``None`` or 0: none.
    """
    if floor is None or (isinstance(floor, (int, float)) and not isinstance(floor, bool) and floor == 0):
        floors = [0] * len(sizes)
    elif floor == "auto":
        scale = min(1.0, 0.5 * target_kept / sum(rows))
        floors = [max(1, int(r * scale)) for r in rows]
    elif floor == "unit":
        floors = list(rows)
    elif isinstance(floor, int) and not isinstance(floor, bool) and floor > 0:
        floors = [floor] * len(sizes)
    elif isinstance(floor, float) and 0.0 < floor < 1.0:  # NaN fails both comparisons
        floors = [max(1, math.ceil(floor * n)) for n in sizes]
    else:
        raise ValueError(
            f"floor must be 'auto', 'unit', a positive int, a float in (0, 1) or None; got {floor!r}"
        )
    floors = [min(f, n) for f, n in zip(floors, sizes)]
    if sum(floors) > target_kept:
        raise ValueError(
            f"the per-layer floors keep {sum(floors)} weights but the budget at sparsity "
            f"{sparsity} is {target_kept}: set the floor to 'auto', a smaller value or None "
            "(ProbMask(floor=...); prune.floor in a run config)"
        )
    return floors
