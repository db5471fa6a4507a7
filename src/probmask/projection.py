"""Exact Euclidean projection of all scores onto the global budget.

The feasible set is ``{s : 0 <= s_i <= 1, sum_i s_i <= k}``, optionally with per-layer floors
``sum_{i in layer l} s_i >= floor_l``. Its projection has the closed form
``s_i <- clamp(s_i - c_l, 0, 1)`` where ``c_l = v`` for every layer whose floor does not bind and
``c_l < v`` (its own threshold, meeting the floor exactly) for layers whose floor binds.

``f(c) = sum_i clamp(s_i - c, 0, 1)`` is monotone and piecewise linear. We find its root with
Newton steps that use the count ``#{i : s_i > c}`` as slope. That slope is never smaller than the
true one, so a step taken from the left of the root never passes it (``f`` lies above the
tangent line on the right), the iteration is monotone from the left, and it stops when the step
is below one float32 unit in the last place (or ``f`` meets the budget to the accuracy of its
float32 sum): the answer is exact to float32, not to a tolerance. Steps from the right of the
root and float32 rounding are safeguarded by a bracket (see ``_Search``).

Floors enter the same iteration: the budget equation is ``sum_l max(f_l(v), floor_l) = k``
(a layer held at its floor contributes the floor and no slope), so one Newton iteration with
per-layer sums finds v; the layers short of their floor at v then solve for their own
thresholds together, in one vectorised iteration over those layers only.

On an accelerator the iterations run in blocks without any host synchronisation; one
synchronisation per block checks convergence (and NaN/inf). On the CPU, where reading a result
is free, convergence is checked after every step, the scalar arithmetic runs in numpy, and each
pass goes through the scores in cache-sized chunks instead of through a full-size temporary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["ProjectionResult", "project", "project_", "work_buffer"]

_FIRST_BLOCK = 2  # accelerators: a warm start usually converges within two Newton steps
_BLOCK = 4  # accelerators: Newton iterations between two host synchronisations after that
_MAX_ITERS = 256
_SUM_RTOL = 2.0**-21  # about four float32 ulps: the accuracy of a float32 sum of clamped scores
_FLOOR_RTOL = 1e-6  # a layer whose sum is this close to its floor counts as meeting it
# On the CPU the scores are processed in chunks of this many elements: the work buffer stays in
# the cache, so an evaluation reads the scores from memory once instead of writing and re-reading
# a full-size temporary. (On the CPU a "host sync" costs nothing, so convergence is checked after
# every Newton step there; accelerators check once per block.)
_CPU_CHUNK = 1 << 18


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
    work tensor (see :func:`work_buffer`; a tensor shaped like ``scores`` also works), so that a
    step allocates nothing.
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
    nlayers = len(sizes)
    plan = _Plan(scores, sizes, buffer)
    layer_floors = None
    if floors is not None:
        layer_floors = floor_t.numpy() if plan.host else floor_t.to(scores.device)
    v, last = _solve_budget(plan, float(budget), layer_floors, max(float(start), 0.0))
    thresholds = [v] * nlayers
    binding = [False] * nlayers
    if layer_floors is not None:
        # layers whose sum at v falls short of their floor get their own, lower threshold
        short = plan.to_host(last[1] < layer_floors * (1 - _FLOOR_RTOL))
        bound = [i for i in range(nlayers) if short[i]]
        if bound:
            for i, c in zip(bound, _solve_floors(plan, bound, layer_floors, last)):
                thresholds[i] = c
                binding[i] = True
    plan.apply(thresholds)
    return ProjectionResult(
        v,
        torch.tensor(thresholds, dtype=torch.float64),
        torch.tensor(binding, dtype=torch.bool),
        plan.iterations,
    )


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


def work_buffer(scores: Tensor) -> Tensor:
    """A work buffer for :func:`project_` on these scores: full size on an accelerator, one
    chunk on the CPU (where the projection works chunk by chunk in the cache)."""
    n = scores.numel()
    return torch.empty(min(n, _CPU_CHUNK) if _on_host(scores.device) else n, dtype=scores.dtype, device=scores.device)


def _on_host(device: torch.device) -> bool:
    """Whether to run the CPU way (chunks, numpy search, a check every step) on this device."""
    return device.type == "cpu"


class _Plan:
    """The scores cut into chunks, each inside one layer, with a work view for each chunk.

    On the CPU chunks have at most ``_CPU_CHUNK`` elements and share one small work buffer, and
    the search's scalar arithmetic runs in numpy (reading a CPU tensor needs no synchronisation
    and numpy's scalar operations cost a fraction of torch's). On an accelerator a chunk is a
    whole layer with its own view of a full-size buffer, and everything stays on the device.
    """

    def __init__(self, scores: Tensor, sizes: list[int], buffer: Tensor | None) -> None:
        self.device = scores.device
        self.host = _on_host(scores.device)
        self.xp: Any = np if self.host else torch
        self.nlayers = len(sizes)
        chunk = _CPU_CHUNK if self.host else max(sizes)
        need = min(chunk, max(sizes)) if self.host else scores.numel()
        ok = (
            buffer is not None
            and buffer.device == scores.device
            and buffer.dtype == scores.dtype
            and buffer.dim() == 1
            and buffer.numel() >= need
        )
        work = buffer if ok else torch.empty(need, dtype=scores.dtype, device=scores.device)
        assert work is not None
        self.src: list[Tensor] = []
        self.work: list[Tensor] = []
        self.layer: list[int] = []
        offset = 0
        for i, size in enumerate(sizes):
            for lo in range(0, size, chunk):
                length = min(chunk, size - lo)
                self.src.append(scores[offset + lo : offset + lo + length])
                w0 = 0 if self.host else offset + lo
                self.work.append(work[w0 : w0 + length])
                self.layer.append(i)
            offset += size
        self.per_layer = len(self.src) != self.nlayers  # chunk sums must be gathered per layer
        self.all = self.subset(range(self.nlayers))
        self.iterations = 0  # evaluations done so far

    # -------------------------------------------------------------- arrays of the search
    def full(self, count: int | None, value: float, dtype: str = "float64") -> Any:
        """An array of the search (numpy on the CPU, a device tensor elsewhere); 0-dim if count is None."""
        shape = () if count is None else (count,)
        if self.host:
            return np.full(shape, value, dtype=dtype)
        return torch.full(shape, value, dtype=getattr(torch, dtype), device=self.device)

    def f32(self, x: Any) -> Any:
        return x.astype(np.float32) if self.host else x.float()

    def f64(self, x: Any) -> Any:
        return np.asarray(x, dtype=np.float64) if self.host else x.double()

    def to_host(self, x: Any) -> list:
        return np.asarray(x).reshape(-1).tolist() if self.host else x.reshape(-1).tolist()

    # -------------------------------------------------------------- passes over the scores
    def subset(self, layers: Sequence[int]) -> tuple[list[int], list[int], Any]:
        """The chunks of ``layers`` (ascending) and each chunk's position in ``layers``."""
        where = {layer: j for j, layer in enumerate(layers)}
        chunks = [k for k, i in enumerate(self.layer) if i in where]
        local = [where[self.layer[k]] for k in chunks]
        index = np.array(local, dtype=np.int64) if self.host else torch.tensor(local, device=self.device)
        return chunks, local, index

    def evaluate(self, c32: Any, subset: tuple[list[int], list[int], Any], count: int, check: bool = False):
        """Per-layer f(c) = sum clamp(s - c, 0, 1) and slope counts #{s > c} over ``subset``.

        ``c32`` is one float32 threshold for all, or one per layer of the subset. With ``check``
        it also returns the raw sum of the scores (clamping hides +-inf; NaN shows there too).
        No host synchronisation on an accelerator.
        """
        chunks, local, index = subset
        if self.host:
            cs = np.asarray(c32).reshape(-1).tolist()  # python floats: the cheapest scalar operand
        else:
            cs = c32.reshape(-1)
        scalar = len(cs) == 1
        sums = []
        for j, k in enumerate(chunks):
            src, work = self.src[k], self.work[k]
            if check:
                sums.append(src.sum())
            torch.sub(src, cs[0] if scalar else cs[local[j]], out=work).clamp_(0.0, 1.0)
            sums.append(work.sum())
            sums.append(work.ceil_().sum())  # 1 where s > c, else 0: faster than count_nonzero on CPU
        per = 3 if check else 2
        stacked = torch.stack(sums).view(-1, per)
        raw = None
        if self.host:
            values = np.array(stacked.tolist(), dtype=np.float64)
            if check:
                raw = values[:, 0].sum()
            f, n = values[:, per - 2], values[:, per - 1]
            if len(chunks) != count:
                f = np.bincount(index, weights=f, minlength=count)
                n = np.bincount(index, weights=n, minlength=count)
            return f, n, raw
        values = stacked.double()
        if check:
            raw = values[:, 0].sum()
        f, n = values[:, per - 2], values[:, per - 1]
        if len(chunks) != count:
            zeros = torch.zeros(count, dtype=torch.float64, device=self.device)
            f, n = zeros.index_add(0, index, f), zeros.index_add(0, index, n)
        return f, n, raw

    def layer_min(self, subset: tuple[list[int], list[int], Any], count: int) -> Any:
        """The smallest score of each layer of ``subset``."""
        mins = torch.stack([self.src[k].amin() for k in subset[0]]).double()
        if self.host:
            out = np.full(count, math.inf)
            np.minimum.at(out, subset[2], mins.numpy())
            return out
        out = torch.full((count,), math.inf, dtype=torch.float64, device=self.device)
        return out.scatter_reduce_(0, subset[2], mins, "amin")

    def apply(self, thresholds: list[float]) -> None:
        """In place: s <- clamp(s - c_l, 0, 1) with each layer's threshold."""
        for src, i in zip(self.src, self.layer):
            src.sub_(thresholds[i]).clamp_(0.0, 1.0)


class _Search:
    """Safeguarded Newton iteration for f(c) = target, f non-increasing and piecewise linear.

    Vectorised over independent problems (one entry, or one per layer), in the plan's arrays; no
    host syncs on an accelerator. The slope is the count #{s > c}, never smaller than the true
    slope anywhere to the right of c: from the left (f >= target) a step never passes the root,
    so the iterates rise monotonically to it. From the right a step may land on either side;
    the count overstates the slope there when scores sit above c + 1, so a second point on the
    right steps with the secant slope of the two right points instead. The search keeps the
    bracket [lo, hi] of the largest point seen with f >= target and the smallest with
    f < target, and falls back to it where neither helps: no slope from the right (go to lo), or
    a step leaving the bracket, which float32 rounding of the sums can cause when many scores
    tie (bisect). ``lo`` starts as a lower limit of the search, not known to be a left point
    unless ``lo_known``.
    """

    def __init__(self, plan: _Plan, lo: Any, target: Any, lo_known: bool) -> None:
        self.plan, self.xp = plan, plan.xp
        count = None if lo.ndim == 0 else lo.shape[0]
        self.lo = lo
        self.target = target
        self.tol = _SUM_RTOL * self.xp.maximum(target, plan.full(count, 1.0))
        self.lo_ok = plan.full(count, lo_known, "bool")
        self.hi = plan.full(count, math.inf)
        self.f_hi = plan.full(count, 0.0)  # f at hi
        self.inf32 = plan.full(None, math.inf, "float32")
        self.one = plan.full(None, 1.0)

    def step(self, c32: Any, f: Any, slope: Any) -> tuple[Any, Any]:
        """(next point in float64, done) from the evaluation f(c32) and its slope count."""
        xp, plan, target = self.xp, self.plan, self.target
        c = plan.f64(c32)
        left = f >= target
        # f equals the target to the accuracy of a float32 sum (a few ulps): take the Newton point
        close = abs(f - target) <= self.tol
        right = ~left & ~close
        had_right = xp.isfinite(self.hi)
        with np.errstate(divide="ignore", invalid="ignore"):
            secant = (f - self.f_hi) / (self.hi - c)  # > 0 when both are right points and f rose
        lo = xp.where(left, xp.maximum(self.lo, c), self.lo)
        lo_ok = self.lo_ok | left
        hi = xp.where(left, self.hi, xp.minimum(self.hi, c))
        self.f_hi = xp.where(left | (c > self.hi), self.f_hi, f)
        nxt = c + (f - target) / xp.maximum(slope, self.one)
        use_secant = right & had_right & (secant > 0) & (secant < slope)
        nxt = xp.where(use_secant, c + (f - target) / xp.where(use_secant, secant, self.one), nxt)
        nxt = xp.where(right & (slope == 0), lo, nxt)
        outside = (nxt >= hi) | ((nxt <= lo) & ~left)
        nxt = xp.where(~close & outside & lo_ok & xp.isfinite(hi), 0.5 * (lo + hi), nxt)
        nxt = xp.maximum(nxt, lo)
        # done: the step is below one float32 ulp, f is close, or the bracket is down to
        # neighbouring floats (then hi, where f < target, is the answer)
        ulp = xp.nextafter(abs(c32), self.inf32) - abs(c32)
        tight = lo_ok & (hi <= plan.f64(xp.nextafter(plan.f32(lo), self.inf32)))
        nxt = xp.where(tight & ~close, hi, nxt)
        done = (abs(plan.f32(nxt) - c32) <= ulp) | close | tight
        self.lo, self.hi, self.lo_ok = lo, hi, lo_ok
        return nxt, done

    def round_up(self, nxt: Any) -> list[float]:
        """The float32 at or above each Newton point, so that f(v) <= target rather than just above."""
        xp, plan = self.xp, self.plan
        v32 = plan.f32(nxt)
        v32 = xp.where(plan.f64(v32) < nxt, xp.nextafter(v32, self.inf32), v32)
        return [float(x) for x in plan.to_host(v32)]


def _blocks(host: bool):
    """Newton steps between two host synchronisations (on the CPU a sync costs nothing)."""
    if host:
        while True:
            yield 1
    yield _FIRST_BLOCK
    while True:
        yield _BLOCK


def _raise_non_finite() -> None:
    raise ValueError(
        "NaN or inf in the scores at projection time: check the learning rate of the "
        "score optimizer and the loss for NaN"
    )


def _not_converged(iters: int) -> RuntimeError:
    return RuntimeError(
        f"projection did not converge in {iters} iterations; please report this with your scores"
    )


def _solve_budget(plan: _Plan, budget: float, floors: Any, start: float) -> tuple[float, tuple[Any, Any, Any]]:
    """Smallest float32 v >= 0 with g(v) <= budget, g(v) = sum_l max(f_l(v), floor_l).

    A layer whose sum at v is below its floor contributes its floor (it will get its own lower
    threshold) and no slope. Returns v and the last evaluation: its point and per-layer f and
    slope counts.
    """
    xp = plan.xp
    search = _Search(plan, plan.full(None, 0.0), plan.full(None, budget), lo_known=False)
    c = plan.full(None, start)
    iters = 0
    blocks = _blocks(plan.host)
    raw_total = None
    zero = plan.full(None, 0.0)
    while iters < _MAX_ITERS:
        for _ in range(next(blocks)):
            c32 = plan.f32(c)
            f_l, n_l, raw = plan.evaluate(c32, plan.all, plan.nlayers, check=raw_total is None)
            raw_total = raw if raw_total is None else raw_total
            if floors is None:
                g, slope = f_l.sum(), n_l.sum()
            else:
                g = xp.maximum(f_l, floors).sum()
                slope = xp.where(f_l > floors, n_l, zero).sum()
            c, done = search.step(c32, g, slope)
            iters += 1
        if plan.host:
            state = [bool(done), bool(np.isfinite(g) and np.isfinite(raw_total))]
        else:
            ok = torch.isfinite(g) & torch.isfinite(raw_total)
            state = torch.stack([done, ok]).tolist()  # the one host sync of this block
        if not state[1]:
            _raise_non_finite()
        if state[0]:
            plan.iterations += iters
            return search.round_up(c)[0], (c32, f_l, n_l)
    raise _not_converged(iters)


def _solve_floors(plan: _Plan, layers: list[int], floors: Any, last: tuple[Any, Any, Any]) -> list[float]:
    """For ``layers`` (all short of their floor at v), the float32 c_l < v with f_l(c_l) = floor_l.

    These layers iterate together, each with its own threshold, starting from the budget
    solve's last evaluation (so the first Newton step costs no pass). The smallest score minus
    one is a known left point of each layer (f_l = its size there).
    """
    count = len(layers)
    pos = np.array(layers) if plan.host else torch.tensor(layers, device=plan.device)
    subset = plan.subset(layers)
    search = _Search(plan, plan.layer_min(subset, count) - 1.0, floors[pos], lo_known=True)
    c32 = last[0] + plan.full(count, 0.0, "float32")
    f, n = last[1][pos], last[2][pos]
    iters = 0
    blocks = _blocks(plan.host)
    while iters < _MAX_ITERS:
        for _ in range(next(blocks)):
            if iters > 0:
                f, n, _ = plan.evaluate(c32, subset, count)
            c, done = search.step(c32, f, n)
            iters += 1
            c32 = plan.f32(c)
        if bool(done.all()):  # the one host sync of this block
            plan.iterations += iters - 1
            return search.round_up(c)
    raise _not_converged(iters)
