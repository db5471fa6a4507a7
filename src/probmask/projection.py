"""Exact Euclidean projection of all scores onto the global budget.

The feasible set is ``{s : 0 <= s_i <= 1, sum_i s_i <= k}``, optionally with per-layer floors
``sum_{i in layer l} s_i >= floor_l``. Its projection has the closed form
``s_i <- clamp(s_i - c_l, 0, 1)`` where ``c_l = v`` for every layer whose floor does not bind and
``c_l < v`` (its own threshold, meeting the floor exactly) for layers whose floor binds.

``f(c) = sum_i clamp(s_i - c, 0, 1)`` is monotone and piecewise linear. We find its root with
Newton steps that use the count ``#{i : s_i > c}`` as slope. That slope is never smaller than the
true one, so a step taken from the left of the root never passes it (``f`` lies above the
tangent line on the right), the iteration is monotone from the left, and it stops when the step
is below one float32 unit in the last place: the answer is exact to float32, not to a tolerance.
The iterations run in blocks without any host synchronisation; one synchronisation per block
checks convergence (and NaN/inf).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ProjectionResult", "project", "project_"]

_FIRST_BLOCK = 2  # a warm start usually converges within two Newton steps
_BLOCK = 4  # Newton iterations between two host synchronisations after that
_MAX_BLOCKS = 64
_SUM_RTOL = 2.0**-21  # about four float32 ulps: the accuracy of a float32 sum of clamped scores


@dataclass(frozen=True)
class ProjectionResult:
    """What a projection did: per-layer thresholds, binding floors and the work it took."""

    threshold: float  # the global shift v (0 when the budget did not bind)
    layer_thresholds: Tensor  # c_l per layer (v, or lower for layers held up by their floor)
    floor_binding: Tensor  # bool per layer: the layer's floor was active
    iterations: int  # Newton evaluations in total (each costs about one pass over the scores)


def project_(
    scores: Tensor,
    budget: float,
    *,
    sizes: Sequence[int] | None = None,
    floors: Sequence[float] | Tensor | None = None,
    start: float = 0.0,
    buffer: Tensor | None = None,
) -> ProjectionResult:
    """Project a flat score tensor in place onto ``{0<=s<=1, sum s<=budget, layer sums>=floors}``.

    ``sizes`` splits the flat tensor into layers (needed for ``floors``). ``start`` warm-starts
    the search (the previous step's threshold is a good guess). ``buffer`` is an optional kept
    work tensor of the same shape, so that a step allocates nothing of full size.
    Raises ``ValueError`` on NaN/inf scores, a budget below the floors, or a non-positive budget.
    """
    if scores.dim() != 1:
        raise ValueError(f"project_ expects a flat 1-D score tensor, got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be floating point, got {scores.dtype}")
    n = scores.numel()
    sizes = [n] if sizes is None else [int(x) for x in sizes]
    if sum(sizes) != n or any(x <= 0 for x in sizes):
        raise ValueError(f"sizes {sizes} do not split {n} scores into non-empty layers")
    if not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"budget must be a positive finite number of kept weights, got {budget}")
    floor_t = _floors_tensor(floors, sizes)
    floor_total = float(floor_t.sum())
    if floor_total > budget * (1 + 1e-9):
        raise ValueError(
            f"the per-layer floors ask for {floor_total:.0f} kept weights but the budget is "
            f"{budget:.0f}: lower the floors or the sparsity"
        )
    buf = torch.empty_like(scores) if buffer is None else buffer
    parts = list(scores.split(sizes))
    bufs = list(buf.split(sizes))
    nlayers = len(sizes)

    v, iters = _solve([scores], [buf], float(budget), start=max(float(start), 0.0), lower=0.0)
    thresholds = torch.full((nlayers,), v, dtype=torch.float64)
    binding = torch.zeros(nlayers, dtype=torch.bool)
    if floors is None:
        scores.sub_(v).clamp_(0.0, 1.0)
        return ProjectionResult(v, thresholds, binding, iters)
    fixed: dict[int, float] = {}
    while True:
        layer_sums = _apply(parts, bufs, thresholds.tolist())
        low = [
            i
            for i in range(nlayers)
            if i not in fixed and layer_sums[i] < float(floor_t[i]) * (1 - 1e-6)
        ]
        if not low:
            break
        for i in low:  # each newly bound layer gets its own threshold, meeting its floor
            fixed[i], it = _solve([parts[i]], [bufs[i]], float(floor_t[i]), start=v, lower=None)
            iters += it
        active = [i for i in range(nlayers) if i not in fixed]
        if active:
            rest = float(budget) - sum(float(floor_t[i]) for i in fixed)
            sub_parts = [parts[i] for i in active]
            sub_bufs = [bufs[i] for i in active]
            v, it = _solve(sub_parts, sub_bufs, rest, start=v, lower=0.0)
            iters += it
        for i in range(nlayers):
            thresholds[i] = fixed.get(i, v)
            binding[i] = i in fixed
    scores.copy_(buf)
    return ProjectionResult(v, thresholds, binding, iters)


def project(
    scores: Tensor | Sequence[Tensor],
    budget: float,
    *,
    floors: Sequence[float] | Tensor | None = None,
) -> tuple[list[Tensor] | Tensor, ProjectionResult]:
    """Out-of-place projection of one tensor or a list of per-layer tensors (any shapes)."""
    if isinstance(scores, Tensor):
        flat = scores.detach().reshape(-1).clone()
        result = project_(flat, budget, floors=floors)
        return flat.view_as(scores), result
    tensors = list(scores)
    if not tensors:
        raise ValueError("project() needs at least one score tensor")
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    sizes = [t.numel() for t in tensors]
    result = project_(flat, budget, sizes=sizes, floors=floors)
    return [p.view_as(t) for p, t in zip(flat.split(sizes), tensors)], result


def _floors_tensor(floors: Sequence[float] | Tensor | None, sizes: list[int]) -> Tensor:
    if floors is None:
        return torch.zeros(len(sizes), dtype=torch.float64)
    t = torch.as_tensor(floors, dtype=torch.float64).reshape(-1)
    if t.numel() != len(sizes):
        raise ValueError(f"got {t.numel()} floors for {len(sizes)} layers")
    if bool((t < 0).any()) or bool((t > torch.tensor(sizes, dtype=torch.float64)).any()):
        raise ValueError("each floor must lie between 0 and its layer's number of weights")
    return t


def _evaluate(parts: list[Tensor], bufs: list[Tensor], c: Tensor) -> tuple[Tensor, Tensor]:
    """f(c) = sum clamp(s - c, 0, 1) and the slope count #{s > c}, without host syncs."""
    f = None
    count = None
    for p, b in zip(parts, bufs):
        torch.sub(p, c, out=b)
        b.clamp_(0.0, 1.0)
        fp = b.sum()
        cp = b.ceil_().sum()  # 1 where s > c, else 0; much faster than count_nonzero on CPU
        f = fp if f is None else f + fp
        count = cp if count is None else count + cp
    assert f is not None and count is not None
    return f.double(), count.double()


def _solve(
    parts: list[Tensor], bufs: list[Tensor], target: float, *, start: float, lower: float | None
) -> tuple[float, int]:
    """Smallest float32 threshold c (>= lower) with f(c) <= target, by monotone Newton steps."""
    device = parts[0].device
    c = torch.tensor(start, dtype=torch.float64, device=device)
    inf = torch.tensor(math.inf, dtype=torch.float32, device=device)
    iters = 0
    # clamping hides +-inf, so check the raw sum once (one cheap pass; NaN also shows in f)
    raw_total = torch.stack([p.sum() for p in parts]).sum()
    for block in range(_MAX_BLOCKS):
        for _ in range(_FIRST_BLOCK if block == 0 else _BLOCK):
            c32 = c.float()
            f, count = _evaluate(parts, bufs, c32)
            c = c32.double() + (f - target) / count.clamp_min(1.0)
            if lower is not None:
                c = c.clamp_min(lower)
            iters += 1
        # Converged when the next step is below one float32 ulp, or when f already equals the
        # target to the accuracy of a float32 sum (a few ulps): more steps only jitter.
        ulp = torch.nextafter(c32.abs(), inf) - c32.abs()
        done = ((c.float() - c32).abs() <= ulp) | ((f - target).abs() <= _SUM_RTOL * max(target, 1.0))
        ok = torch.isfinite(f) & torch.isfinite(raw_total)
        state = torch.stack([done, ok]).tolist()  # the one host sync of this block
        if not state[1]:
            raise ValueError(
                "NaN or inf in the scores at projection time: check the learning rate of the "
                "score optimizer and the loss for NaN"
            )
        if state[0]:
            # round the last Newton point up, so that f(v) <= target rather than just above it
            v32 = c.float()
            v32 = torch.where(v32.double() < c, torch.nextafter(v32, inf), v32)
            return float(v32), iters
    raise RuntimeError(
        f"projection did not converge in {iters} iterations; please report this with your scores"
    )


def _apply(parts: list[Tensor], bufs: list[Tensor], thresholds: list[float]) -> list[float]:
    """Write clamp(s - c_l, 0, 1) into the buffers and return the per-part sums."""
    sums = []
    for p, b, c in zip(parts, bufs, thresholds):
        torch.sub(p, c, out=b)
        b.clamp_(0.0, 1.0)
        sums.append(b.sum())
    return [float(x) for x in torch.stack(sums).tolist()]
