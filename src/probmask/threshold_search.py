"""The threshold search of the projection: f(c) = target for a non-increasing, piecewise-linear f,
by safeguarded Newton steps, exact to float32. :mod:`probmask.projection` evaluates f (per-layer
sums over the scores, the "plan"); the searches here decide where to evaluate next, and the solves
decide when a float32 threshold is too coarse and the scores must be shifted.

The plan evaluates ``f(c) = sum clamp(fl32(s - c), 0, 1)`` at a float32 ``c``: the very elements
the projection writes, summed. Every answer is an evaluated point, or a point whose ``f`` the slope
count bounds from one (``f`` is monotone). A search stops where ``f`` meets its target to a
tolerance ("close": for the budget ``-2^-21 k <= f - k <= 2^-21 k - 2^-22 (floors held)``, for a
floor ``2^-22 floor``), or on neighbouring floats ``lo < hi`` with ``f(lo) > target > f(hi)``:
no float32 threshold meets it (ties; or scores so large that the float32 spacing of ``c`` is
coarse: 1/16 near 1e6, where 1000 equal scores move the sum in steps of 62.5). The solve then
shifts that problem's scores in place by ``r = hi`` and searches a residual threshold: the
projection is invariant to a common shift of scores and threshold, the shift is exact for every
score that ends strictly between 0 and 1 once ``|r| >= 4`` (Sterbenz; below that within 2^-24),
scores far from ``r`` clamp either way, and the residual lies in ``[lo - hi, 0]`` within 1 of a
score, where float32 resolves it to 2^-24 or finer. After ``_REFINE_ROUNDS`` shifts the safe end
is the answer: ``hi`` (below the budget), ``lo`` (above a floor).

So, as the plan sums, the budget's sum is at most ``k (1 + 2^-21)`` (binding floors included), and
at least ``k (1 - 2^-21)`` (``k (1 - 2^-20)`` with binding floors) unless one float32 step of the
(residual) threshold crosses that window: then it is below ``k`` and the next float32 threshold
down is above. Binding floors are met to 2^-22 (relative), or from above where float32 cannot. The
float64 sum of the written scores differs by the rounding of the plan's sum only (float32 partial
sums of 128 elements in the C kernel, of cache-sized chunks in PyTorch; float64 in Triton),
measured below 5e-7 relative on tie-heavy inputs: ``sum(s) <= k (1 + 1e-6)``.
"""

from __future__ import annotations

import math
import struct
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["solve"]

_FIRST_BLOCK = 2  # accelerators: a warm start usually converges within two Newton steps
_BLOCK = 4  # accelerators: Newton iterations between two host synchronisations after that
_MAX_ITERS = 256
_SUM_RTOL = 2.0**-21  # a sum this close to the budget (relative) meets it: about four float32 ulps
_FLOOR_SUM_RTOL = 2.0**-22  # a sum this close to its floor (relative) meets it
_FLOOR_RTOL = 1e-6  # a layer whose sum is this close to its floor counts as meeting it
_REFINE_ROUNDS = 2  # shifts of a problem whose threshold float32 cannot resolve
_FLT_MAX = 3.4028234663852886e38  # the largest float32
_TINY = 2.0**-126  # the smallest normal float32: a geometric middle's stand-in for 0
_F32, _I32 = struct.Struct("<f"), struct.Struct("<i")

Plan = Any  # probmask.projection._Plan: evaluates the per-layer sums at given thresholds


# The slope is the count #{s > c}, never smaller than the true slope right of c: from the left
# (f >= target) a step never passes the root, and the iterates rise monotonically to it. The count
# overstates the slope where scores lie above c + 1 (clamped at 1): where f fell by less than half
# the count's prediction over the last step from the left, the next step is at least twice that
# step (eight times where f did not change: a plateau), or bisects the bracket if that goes
# further; without this, one score at 1.25 with a budget just below 1 took one step of
# (f - target) / count per evaluation. From the right a second point steps with the secant of the
# two right points. The bracket [lo, hi] (the largest point seen with f >= target, the smallest
# with f < target) takes over where neither helps: no slope from the right, f not risen from the
# last right point (Newton creeping along a plateau), or a step leaving the bracket or landing on
# one of its ends once rounded to float32, which rounding of the sums causes where scores tie or f
# jitters at the float32 scale of c (bisect: the bracket shrinks every step). A bracket spanning
# orders of magnitude is halved in the exponent (its geometric mean): about 8 halvings take any
# float32 bracket to a factor 4, where halving values takes up to 280. ``lo`` starts as a lower
# limit, a left point only if ``lo_known``; a step that rounds back onto c moves one float32.
# A search stops where f is close (the answer is then the Newton step rounded up to a float32
# where the count proves f stays close: from the left f falls by at most count * step, from the
# right it rises by at most #{s > lo} * step; else c), where a right point is the lower limit
# itself (the budget does not bind: v = 0), or on neighbouring floats (unresolved: the answer is
# hi for a budget, lo for a floor). _HostSearch decides in Python floats, one problem at a time
# (on the CPU tensor arithmetic would cost more than a pass over LeNet-sized scores);
# _DeviceSearch in device tensors, vectorised over problems, without host synchronisation, in as
# few operations per step as it takes (each is a launch): it halves a wide bracket in the exponent
# only from the block after it appeared, and works its answers out after the last step.


def _f32(x: float) -> float:
    """``x`` rounded to float32 (to nearest even), saturating at the largest finite float32."""
    return _F32.unpack(_F32.pack(_FLT_MAX if x > _FLT_MAX else -_FLT_MAX if x < -_FLT_MAX else x))[0]


def _up32(x: float) -> float:
    """The next float32 above the float32 ``x`` (the largest finite float32 stays)."""
    if x >= _FLT_MAX or x == 0.0:
        return x if x else 2.0**-149
    bits = _I32.unpack(_F32.pack(x))[0]
    return _F32.unpack(_I32.pack(bits + 1 if x > 0 else bits - 1))[0]


def _down32(x: float) -> float:
    return -_up32(-x)


def _ceil32(x: float) -> float:
    v = _f32(x)
    return _up32(v) if v < x else v


def _floor32(x: float) -> float:
    v = _f32(x)
    return _down32(v) if v > x else v


def _wide(lo: Any, hi: Any) -> Any:
    """Whether a bracket spans orders of magnitude: more than 2^16 wide and a factor 4 (or 0)."""
    return (hi - lo > 65536.0) & (hi > 4 * lo) & (lo < 4 * hi)


def _middle(lo: float, hi: float) -> float:
    """Where to bisect [lo, hi]: its middle, or for a wide bracket its geometric mean (0 across 0)."""
    if not _wide(lo, hi):
        return 0.5 * (lo + hi)
    if lo >= 0:
        return math.sqrt(max(lo, _TINY) * hi)
    return -math.sqrt(max(-hi, _TINY) * -lo) if hi <= 0 else 0.0


def _middle_t(lo: Tensor, hi: Tensor) -> Tensor:
    geometric = torch.where(lo >= 0, (lo.clamp_min(_TINY) * hi).sqrt(),
                            torch.where(hi <= 0, -((-hi).clamp_min(_TINY) * -lo).sqrt(), 0.0))
    return torch.where(_wide(lo, hi), geometric, 0.5 * (lo + hi))


def _close_answer(c: float, f: float, slope: float, newton: float, target: float, tol: float, upper: float,
                  lo: float, hi: float, n_lo: float) -> tuple[float, float]:
    """(answer, upper bound of f there) where f(c) is close (see above)."""
    v = _ceil32(newton)
    if f >= target:
        v = min(v, hi)
        if v > c and f - slope * (v - c) >= target - tol:
            return v, f
    elif c > v >= lo and f + n_lo * (c - v) <= target + upper:
        return v, f + n_lo * (c - v)
    return c, f


class _HostSearch:
    """One problem. ``size`` bounds #{s > c} (its number of scores); ``below``: a budget (an
    unresolved answer has f < target), else a floor; ``hi``: a known right point (f = 0 there);
    close: target - tol <= f <= target + upper."""

    def __init__(self, lo: float, target: float, lo_known: bool, size: float = math.inf, below: bool = True,
                 hi: float = math.inf, tol: float | None = None, upper: float | None = None) -> None:
        self.lo, self.target, self.lo_ok, self.hi, self.below = lo, target, lo_known, hi, below
        self.tol = _SUM_RTOL * target if tol is None else tol
        self.upper = self.tol if upper is None else upper
        self.f_hi = math.nan  # f at hi once evaluated (NaN: no secant, nor a plateau, before)
        self.f_lo = size if lo_known else math.inf  # f at lo (the known limit: every score counts)
        self.n_lo = size  # #{s > lo}: bounds the slope right of lo
        self.prev: tuple[float, float, float] | None = None  # the last left point: (c, f, slope used)
        self.resolved, self.bound = True, math.inf  # bound: of f at the answer

    def step(self, c: float, f: float, slope: float, held: float = 0.0) -> tuple[float, bool]:
        """(next float32 point, False) or (answer, True) from f and the count at the float32 c;
        ``held`` lowers the upper tolerance there (the floors' allowance)."""
        target, lo, hi, upper = self.target, self.lo, self.hi, self.upper - held
        left = f >= target
        close = -self.tol <= f - target <= upper
        right = not left and not close
        secant = (f - self.f_hi) / (hi - c) if hi != c else math.nan  # NaN without a right point
        lo_was_known = self.lo_ok
        if left and c >= lo:
            lo, self.f_lo, self.n_lo = c, f, slope
        elif not left and c <= hi:
            self.f_hi, hi = f, c
        self.lo, self.hi, self.lo_ok = lo, hi, self.lo_ok or left
        nxt = c + (f - target) / max(slope, 1.0)
        if right and 0.0 < secant < slope:
            nxt = c + (f - target) / secant
        if close:
            answer, self.bound = _close_answer(c, f, slope, nxt, target, self.tol, upper, lo, hi, self.n_lo)
            return answer, True
        if right and c <= lo and not lo_was_known:  # on the right at the lower limit itself
            self.bound = f
            return c, True
        if left and self.prev is not None and c > self.prev[0]:
            pc, pf, ps = self.prev
            if pf - f < 0.5 * ps * (c - pc):  # f fell by less than half the count's prediction
                nxt = max(nxt, c + (8.0 if pf == f else 2.0) * (c - pc))
                if hi != math.inf:
                    nxt = max(nxt, _middle(lo, hi))
        if left:
            self.prev = (c, f, max(slope, 1.0))
        if right and (slope == 0 or secant <= 0.0):  # no slope, or f did not rise from the last right point
            nxt = lo
        r = _f32(nxt)
        if (r >= hi or (r <= lo and not left)) and self.lo_ok and hi != math.inf:
            nxt = _middle(lo, hi)  # outside the bracket once rounded to float32
        nxt = max(nxt, lo)
        if self.lo_ok and hi <= _up32(_f32(lo)):  # neighbouring floats, neither meets the target
            self.resolved = False
            self.bound = self.f_hi if self.below else self.f_lo
            return (hi if self.below else lo), True
        nxt = _f32(nxt)
        if nxt == c:  # rounded back onto c: move one float32
            nxt = _up32(c) if left else max(_down32(c), _f32(lo))
        return nxt, False

    @staticmethod
    def round_up(x: float) -> float:
        return _ceil32(x)


class _DeviceSearch:
    """Problems side by side in device tensors (see _HostSearch); a problem stops changing once it
    is done, and its answer is worked out on the host from the step that finished it."""

    def __init__(self, lo: Tensor, target: Tensor, lo_known: bool, size: Tensor | None = None, below: bool = True,
                 hi: Tensor | None = None, tol: Tensor | None = None, upper: Tensor | None = None) -> None:
        def full(x: float) -> Tensor:
            return torch.full_like(lo, x)

        self.lo, self.target, self.below = lo, target, below
        self.lo_ok = torch.full_like(lo, lo_known, dtype=torch.bool)
        self.tol = _SUM_RTOL * target if tol is None else tol.to(lo)
        self.upper = self.tol if upper is None else upper.to(lo)
        self.hi, self.f_hi = full(math.inf) if hi is None else hi.to(lo), full(math.nan)
        self.n_lo = full(math.inf) if size is None else size.to(lo)
        self.f_lo = self.n_lo if lo_known else full(math.inf)
        self.prev_c, self.prev_f, self.prev_slope = full(0.0), full(0.0), full(math.nan)  # NaN: no creep yet
        self.finished = torch.zeros_like(lo, dtype=torch.bool)
        self.done = torch.zeros((5, *lo.shape), dtype=lo.dtype, device=lo.device)  # c, f, count, step, upper
        self.inf32 = torch.tensor(math.inf, dtype=torch.float32, device=lo.device)
        self.two, self.eight = (torch.tensor(x, dtype=lo.dtype, device=lo.device) for x in (2.0, 8.0))
        self.geometric = False  # bisect wide brackets in the exponent: set at a sync (see wide)

    def wide(self) -> Tensor:
        """Whether a bracket is over 2^16 wide (no sync): ~20 more operations per step pay then."""
        return ((self.hi - self.lo > 65536.0) & (self.hi < math.inf)).any()

    def step(self, c32: Tensor, f: Tensor, slope: Tensor, held: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(next float32 point as float64, done) from f and the count at the float32 points c32."""
        c, slope = c32.double(), slope.double()
        active, d = ~self.finished, f - self.target
        left, right = d >= 0, d < 0
        upper = self.upper if held is None else self.upper - held
        close = (d >= -self.tol) & (d <= upper)
        secant = (f - self.f_hi) / (self.hi - c)  # NaN without a right point or at c = hi
        lo_was_known, flat = self.lo_ok, secant <= 0
        now_left = active & left
        new_lo, new_hi = now_left & (c >= self.lo), active & right & (c <= self.hi)
        lo, hi = torch.where(new_lo, c, self.lo), torch.where(new_hi, c, self.hi)
        self.f_lo, self.n_lo = torch.where(new_lo, f, self.f_lo), torch.where(new_lo, slope, self.n_lo)
        self.f_hi = torch.where(new_hi, f, self.f_hi)
        lo_ok = lo_was_known | now_left
        newton = c + d / slope.clamp_min(1.0)
        newton = torch.where(right & (secant > 0) & (secant < slope), c + d / secant, newton)
        at_limit = right & (c <= lo) & ~lo_was_known
        mid = _middle_t(lo, hi) if self.geometric else 0.5 * (lo + hi)
        dc = c - self.prev_c
        creep = left & (dc > 0) & (self.prev_f - f < 0.5 * self.prev_slope * dc)
        further = c + torch.where(self.prev_f == f, self.eight, self.two) * dc
        further = torch.where(hi < math.inf, torch.maximum(further, mid), further)
        nxt = torch.where(creep, torch.maximum(newton, further), newton)
        self.prev_c, self.prev_f = torch.where(now_left, c, self.prev_c), torch.where(now_left, f, self.prev_f)
        self.prev_slope = torch.where(now_left, slope.clamp_min(1.0), self.prev_slope)
        nxt = torch.where(right & ((slope == 0) | flat), lo, nxt)
        r = self._f32(nxt).double()
        outside = (r >= hi) | ((r <= lo) & right)  # then hi is finite
        nxt = torch.maximum(torch.where(outside & lo_ok, mid, nxt), lo)
        lo32 = lo.float()
        tight = lo_ok & (hi <= torch.nextafter(lo32, self.inf32).double())
        n32 = self._f32(nxt)
        moved = torch.where(left, torch.nextafter(c32, self.inf32), torch.maximum(torch.nextafter(c32, -self.inf32), lo32))
        n32 = torch.where(n32 == c32, moved, n32)
        newly = active & (close | at_limit | tight)
        self.done = torch.where(newly, torch.stack([c, f, slope, newton, upper.expand_as(c)]), self.done)
        self.finished = self.finished | newly
        self.lo, self.hi, self.lo_ok = lo, hi, lo_ok
        return torch.where(self.finished, c, n32.double()), self.finished  # done: evaluate there again

    def outcome(self) -> list[tuple[float, float, bool, float, float, float]]:
        """Per problem (answer, upper bound of f there, resolved, lo, hi, last point), one sync."""
        rows = torch.stack([x.expand(self.lo.shape).double() for x in (
            *self.done, self.lo, self.hi, self.f_lo, self.f_hi, self.n_lo, self.lo_ok, self.target, self.tol)])
        out = []
        for c, f, n, newton, upper, lo, hi, f_lo, f_hi, n_lo, lo_ok, target, tol in zip(*rows.reshape(13, -1).tolist()):
            if -tol <= f - target <= upper:
                out.append((*_close_answer(c, f, n, newton, target, tol, upper, lo, hi, n_lo), True, lo, hi, c))
            elif not lo_ok:  # on the right at the lower limit
                out.append((c, f, True, lo, hi, c))
            else:
                out.append((hi, f_hi, False, lo, hi, c) if self.below else (lo, f_lo, False, lo, hi, c))
        return out

    @staticmethod
    def _f32(x: Tensor) -> Tensor:
        return x.clamp(-_FLT_MAX, _FLT_MAX).float()


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


def _check_raw(plan: Plan) -> None:
    """A raw sum was not finite: NaN or inf, or finite scores whose float32 sum overflowed (near the
    float32 limit). One more pass tells."""
    if not plan.finite():
        _raise_non_finite()


def _not_converged(iters: int) -> RuntimeError:
    return RuntimeError(
        f"projection did not converge in {iters} iterations; please report this with your scores"
    )


# ------------------------------------------------------------------------------ the solves
# First the global threshold: the smallest float32 v >= 0 with g(v) <= budget, where
# g(v) = sum_l max(f_l(v), floor_l): a layer short of its floor at v contributes its floor (it
# will get its own threshold) and no slope. Where float32 cannot resolve v (neighbouring floats
# lo < hi), the layers short of their floor already at lo are set aside (their floor binds on
# all of [lo, hi]), the others are shifted by hi and searched again, so that a layer whose sum
# crosses its floor inside the bracket is classified at the resolved v. Then the layers short of
# their floor at v solve f_l(c_l) = floor_l, each with its own threshold, from the evaluation
# that classified them (no pass for the first step), between the smallest score minus one
# (rounded down: f_l = its size there) and the largest (f_l = 0); shifted and solved again where
# float32 cannot resolve them. Last, where v stayed unresolved or a binding layer ended above its
# floor by more than its tolerance, the other layers solve again for one shared threshold against
# what the binding layers left of the budget. A solve returns (v, per-layer thresholds to apply to
# the scores as they are now, per-layer thresholds of the original scores, floor binding).


class _Spec(NamedTuple):
    """One problem: f(c) = target for c >= lo; lo_known: f = size at lo, which is then the largest
    float32 below ``smallest - 1``; f = 0 at hi (the largest score), if given."""

    lo: float
    target: float
    lo_known: bool
    size: float
    below: bool = True
    hi: float = math.inf
    tol: float | None = None
    upper: float | None = None
    smallest: float = 0.0


def _start(lo: float, hi: float, limit: float) -> float:
    """Where the search of a problem shifted by hi starts: lo - hi (exact: neighbouring floats),
    or -1 when that is below -1 (an active score then equals hi: the residual lies in [-1, 0])."""
    return max(_f32(max(lo - hi, -1.0)), limit)


def _floor_limit(smallest: float) -> float:
    """The largest float32 at most ``smallest - 1`` (every score counts 1 there), or -FLT_MAX."""
    lo = _floor32(smallest - 1.0)
    return max(_down32(smallest) if lo >= smallest else lo, -_FLT_MAX)  # |smallest| > 2^53: -1 is lost


def solve(run: Any, plan: Plan, budget: float, floors: Tensor | None,
          start: float) -> tuple[float, list[float], list[float], list[bool]]:
    """The projection's thresholds. ``run`` runs searches over the plan's sums (on the host or in
    device tensors: :class:`probmask.projection._HostRun`, ``_DeviceRun``): ``run.solve(layers,
    shared, specs, starts, first, fls, check)`` gives each problem's (answer, bound, resolved, lo,
    hi) and, for a shared problem with floors, its last point with the per-layer (f, count) there;
    ``run.layer_sums(layers, c)`` the per-layer (f, count) at one float32 threshold."""
    nl = plan.nlayers
    fl = None if floors is None else floors.tolist()
    shifts, thresholds = [0.0] * nl, [0.0] * nl
    layers, target, limit, c, g_shift = list(range(nl)), budget, 0.0, _f32(max(start, 0.0)), 0.0
    sure: list[tuple[int, float, float, float]] = []  # (layer, start, f, count): its floor binds
    for rnd in range(_REFINE_ROUNDS + 1):
        upper = _SUM_RTOL * budget - _FLOOR_SUM_RTOL * sum(fl[b[0]] for b in sure) if sure else None
        spec = _Spec(limit, target, False, float(sum(plan.sizes[i] for i in layers)), upper=upper)
        fls = None if fl is None else [fl[i] for i in layers]
        (out,), last = run.solve(layers, True, [spec], [c], fls=fls, check=rnd == 0)
        v, _, resolved, lo, hi = out
        if resolved or rnd == _REFINE_ROUNDS:
            break
        f_lo, n_lo = run.layer_sums(layers, lo) if fl is not None else ([], [])
        keep = []
        for p, i in enumerate(layers):
            if fl is not None and f_lo[p] < fl[i] * (1 - _FLOOR_RTOL):
                sure.append((i, lo, f_lo[p], n_lo[p]))
                target -= fl[i]
            else:
                keep.append(i)
        layers, target = keep, max(target, 0.0)
        if not layers:
            break
        plan.shift(layers, [hi] * len(layers))
        for i in layers:
            shifts[i] += hi
        g_shift += hi
        limit = _f32(limit - hi)
        c = _start(lo, hi, limit)
    for i in layers:
        thresholds[i] = v
    bound = list(sure)
    if fl is not None and layers:
        c_cls, f_cls, n_cls = last if v == last[0] or v != hi else (v, *run.layer_sums(layers, v))
        bound += [(i, c_cls, f_cls[p], n_cls[p]) for p, i in enumerate(layers) if f_cls[p] < fl[i] * (1 - _FLOOR_RTOL)]
    over = _floors(run, plan, fl, bound, thresholds, shifts) if bound else 0.0
    binding = [False] * nl
    for b in bound:
        binding[b[0]] = True
    free = [i for i in layers if not binding[i]]
    if free and (not resolved or over > 0.0):
        floors_bound = sum(fl[b[0]] for b in bound) if bound else 0.0
        spec = _Spec(limit, max(budget - floors_bound - over, 0.0), False, float(sum(plan.sizes[i] for i in free)),
                     upper=_SUM_RTOL * budget - _FLOOR_SUM_RTOL * floors_bound)
        if resolved:  # only the target moved: the same scores, from v
            (out,), _ = run.solve(free, True, [spec], [v])
        v = _refined(run, plan, [free], [spec], [out], shifts, shared=True)[0][0]
        for i in free:
            thresholds[i] = v
    report = [s + t for s, t in zip(shifts, thresholds)]
    return max(report[free[0]] if free else g_shift + v, 0.0), thresholds, report, binding


def _floors(run: Any, plan: Plan, fl: list[float], bound: list[tuple[int, float, float, float]],
            thresholds: list[float], shifts: list[float]) -> float:
    """The layers of ``bound`` (layer, float32 start, f and count there) meet their floors with
    their own thresholds. Returns how far their sums may exceed the floors beyond the tolerance
    (0 unless float32 could not resolve a floor)."""
    layers = [b[0] for b in bound]
    subset = plan.subset(layers)
    mins, maxs = [math.inf] * len(layers), [-math.inf] * len(layers)
    for (a, b), j in zip(plan.layer_range(subset).tolist(), subset[1]):  # one sync
        mins[j], maxs[j] = min(mins[j], a), max(maxs[j], b)
    specs = [_Spec(_floor_limit(a), fl[i], True, float(plan.sizes[i]), False, b, _FLOOR_SUM_RTOL * fl[i], smallest=a)
             for a, b, i in zip(mins, maxs, layers)]
    outs, _ = run.solve(layers, False, specs, [b[1] for b in bound], first=([b[2] for b in bound], [b[3] for b in bound]))
    outs = _refined(run, plan, [[i] for i in layers], specs, outs, shifts, shared=False)
    over = 0.0
    for (answer, bnd, *_), i in zip(outs, layers):
        thresholds[i] = answer
        over += max(0.0, bnd - fl[i] - _FLOOR_SUM_RTOL * fl[i])
    return over


def _refined(run: Any, plan: Plan, groups: list[list[int]], specs: list[_Spec], outs: list[tuple], shifts: list[float],
             shared: bool) -> list[tuple]:
    """Outcomes (answer, bound, resolved, lo, hi) of problems (one threshold per group of layers),
    solved again while float32 cannot resolve them: each round shifts an unresolved problem's
    layers by its hi and searches for a residual threshold (its limits shift with it; rounding is
    monotone, so the smallest and largest scores shift to the smallest and largest)."""
    specs, outs = list(specs), list(outs)
    for _ in range(_REFINE_ROUNDS):
        todo = [j for j, o in enumerate(outs) if not o[2]]
        if not todo:
            break
        starts = []
        for j in todo:
            lo, r, s = outs[j][3], outs[j][4], specs[j]
            plan.shift(groups[j], [r] * len(groups[j]))
            for i in groups[j]:
                shifts[i] += r
            if s.lo_known:
                smallest = _f32(s.smallest - r)
                specs[j] = s._replace(lo=_floor_limit(smallest), hi=_f32(s.hi - r), smallest=smallest)
            else:
                specs[j] = s._replace(lo=_f32(s.lo - r))
            starts.append(_start(lo, r, specs[j].lo))
        new, _ = run.solve([i for j in todo for i in groups[j]], shared, [specs[j] for j in todo], starts)
        for j, o in zip(todo, new):
            outs[j] = o
    return outs
