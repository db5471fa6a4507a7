"""The threshold search of the projection: f(c) = target for a non-increasing, piecewise-linear f,
by safeguarded Newton steps, exact to float32. :mod:`probmask.projection` evaluates f (per-layer
sums over the scores, the "plan"); the two solves here decide where to evaluate next.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["solve_device", "solve_host"]

_FIRST_BLOCK = 2  # accelerators: a warm start usually converges within two Newton steps
_BLOCK = 4  # accelerators: Newton iterations between two host synchronisations after that
_MAX_ITERS = 256
_SUM_RTOL = 2.0**-21  # about four float32 ulps: the accuracy of a float32 sum of clamped scores
_FLOOR_RTOL = 1e-6  # a layer whose sum is this close to its floor counts as meeting it

Plan = Any  # probmask.projection._Plan: evaluates the per-layer sums at given thresholds


# f(c) = target with f non-increasing and piecewise linear, by safeguarded Newton steps.
#
# The slope is the count #{s > c}, never smaller than the true slope anywhere to the right of
# c: from the left (f >= target) a step never passes the root, so the iterates rise
# monotonically to it. The count overstates the slope where scores lie above c + 1 (clamped at
# 1, they add nothing): when f fell by less than half of what the count predicted over the last
# step from the left, the next step is at least twice that step (it may pass the root; the
# bracket below then takes over). Without this, a plateau such as one score at 1.25 with a
# budget just below 1 took one step of (f - target) / count per evaluation. From the right a
# step may land on either side; the count overstates the slope there when scores sit above
# c + 1, so a second point on the right steps with the secant slope of the two right points
# instead. The search keeps the bracket [lo, hi] of the largest point seen with f >= target and
# the smallest with f < target, and falls back to it where neither helps: no slope from the
# right (go to lo), or a step leaving the bracket or landing on one of its ends once rounded to
# float32, which rounding of the sums can cause when many scores tie or f jitters at the float32
# scale of c (bisect: the bracket shrinks every step). ``lo`` starts as a lower limit of the
# search, not known to be a left point unless ``lo_known``. It stops when the next step is below
# one float32 ulp, when f meets the target to the accuracy of a float32 sum (a few ulps), or
# when the bracket is down to neighbouring floats (then hi, where f < target, is the answer);
# the answer is rounded up to a float32, so that f(v) <= target rather than just above.
#
# _HostSearch does this in Python floats, one problem at a time (on the CPU, tensor or numpy
# scalar arithmetic would cost more than a pass over LeNet-sized scores); _DeviceSearch in
# device tensors, vectorised over problems, without host synchronisation. Same decisions.


def _f32(x: float) -> float:
    return float(np.float32(x))


def _up32(x: float) -> float:
    """The next float32 above the float32 ``x``."""
    return float(np.nextafter(np.float32(x), np.float32(math.inf)))


class _HostSearch:
    def __init__(self, lo: float, target: float, lo_known: bool) -> None:
        self.lo, self.target, self.lo_ok = lo, target, lo_known
        self.tol = _SUM_RTOL * max(target, 1.0)
        self.hi, self.f_hi = math.inf, 0.0
        self.prev: tuple[float, float, float] | None = None  # the last left point: (c, f, slope used)

    def step(self, c: float, f: float, slope: float) -> tuple[float, bool]:
        """(next point, done) from f and the slope count at the float32 point c."""
        target, lo, hi = self.target, self.lo, self.hi
        left = f >= target
        close = abs(f - target) <= self.tol
        right = not left and not close
        had_right = hi != math.inf
        secant = (f - self.f_hi) / (hi - c) if had_right and hi != c else math.nan
        if left:
            lo = max(lo, c)
        elif c <= hi:
            self.f_hi, hi = f, c
        lo_ok = self.lo_ok or left
        nxt = c + (f - target) / max(slope, 1.0)
        if left and not close and self.prev is not None and c > self.prev[0]:
            pc, pf, ps = self.prev
            if pf - f < 0.5 * ps * (c - pc):  # f fell by less than half the count's prediction
                nxt = max(nxt, c + 2.0 * (c - pc))  # scores above c + 1: double the step
        if left:
            self.prev = (c, f, max(slope, 1.0))
        if right and had_right and 0.0 < secant < slope:
            nxt = c + (f - target) / secant
        if right and slope == 0:
            nxt = lo
        # outside the bracket once rounded to float32: a step that lands back on lo or hi would
        # repeat an evaluation, and where rounding makes f jitter it can cycle between the two
        r = _f32(nxt)
        outside = r >= hi or (r <= lo and not left)
        if not close and outside and lo_ok and hi != math.inf:
            nxt = 0.5 * (lo + hi)
        nxt = max(nxt, lo)
        tight = lo_ok and hi <= _up32(_f32(lo))
        if tight and not close:
            nxt = hi
        done = abs(_f32(nxt) - c) <= _up32(abs(c)) - abs(c) or close or tight
        self.lo, self.hi, self.lo_ok = lo, hi, lo_ok
        return nxt, done

    @staticmethod
    def round_up(x: float) -> float:
        v = _f32(x)
        return _up32(v) if v < x else v


class _DeviceSearch:
    def __init__(self, lo: Tensor, target: Tensor, lo_known: bool) -> None:
        self.lo, self.target = lo, target
        self.lo_ok = torch.full_like(lo, lo_known, dtype=torch.bool)
        self.tol = _SUM_RTOL * target.clamp_min(1.0)
        self.hi = torch.full_like(lo, math.inf)
        self.f_hi = torch.zeros_like(lo)
        self.inf32 = torch.tensor(math.inf, dtype=torch.float32, device=lo.device)
        self.prev_c, self.prev_f, self.prev_slope = torch.zeros_like(lo), torch.zeros_like(lo), torch.zeros_like(lo)
        self.has_prev = torch.zeros_like(lo, dtype=torch.bool)

    def step(self, c32: Tensor, f: Tensor, slope: Tensor) -> tuple[Tensor, Tensor]:
        """(next point in float64, done) from f and the slope count at the float32 points c32."""
        target, c = self.target, c32.double()
        left = f >= target
        close = (f - target).abs() <= self.tol
        right = ~left & ~close
        had_right = torch.isfinite(self.hi)
        secant = (f - self.f_hi) / (self.hi - c)  # > 0 when both are right points and f rose
        lo = torch.where(left, torch.maximum(self.lo, c), self.lo)
        self.f_hi = torch.where(left | (c > self.hi), self.f_hi, f)
        hi = torch.where(left, self.hi, torch.minimum(self.hi, c))
        lo_ok = self.lo_ok | left
        nxt = c + (f - target) / slope.clamp_min(1.0)
        creep = left & ~close & self.has_prev & (c > self.prev_c) & (self.prev_f - f < 0.5 * self.prev_slope * (c - self.prev_c))
        nxt = torch.where(creep, torch.maximum(nxt, c + 2.0 * (c - self.prev_c)), nxt)  # see _HostSearch.step
        self.prev_c = torch.where(left, c, self.prev_c)
        self.prev_f = torch.where(left, f, self.prev_f)
        self.prev_slope = torch.where(left, slope.clamp_min(1.0).to(self.prev_slope.dtype), self.prev_slope)
        self.has_prev = self.has_prev | left
        use_secant = right & had_right & (secant > 0) & (secant < slope)
        nxt = torch.where(use_secant, c + (f - target) / torch.where(use_secant, secant, 1.0), nxt)
        nxt = torch.where(right & (slope == 0), lo, nxt)
        r = nxt.float().double()  # outside once rounded to float32 (see _HostSearch.step)
        outside = (r >= hi) | ((r <= lo) & ~left)
        nxt = torch.where(~close & outside & lo_ok & torch.isfinite(hi), 0.5 * (lo + hi), nxt)
        nxt = torch.maximum(nxt, lo)
        ulp = torch.nextafter(c32.abs(), self.inf32) - c32.abs()
        tight = lo_ok & (hi <= torch.nextafter(lo.float(), self.inf32).double())
        nxt = torch.where(tight & ~close, hi, nxt)
        done = ((nxt.float() - c32).abs() <= ulp) | close | tight
        self.lo, self.hi, self.lo_ok = lo, hi, lo_ok
        return nxt, done

    def round_up(self, x: Tensor) -> Tensor:
        v32 = x.float()
        return torch.where(v32.double() < x, torch.nextafter(v32, self.inf32), v32)


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


# ------------------------------------------------------------------------------ the solves
# First the global threshold: the smallest float32 v >= 0 with g(v) <= budget, where
# g(v) = sum_l max(f_l(v), floor_l): a layer short of its floor at v contributes its floor (it
# will get its own threshold) and no slope. Then the layers short of their floor at v solve
# f_l(c_l) = floor_l together, each with its own threshold, starting from the first solve's last
# evaluation (so their first Newton step costs no pass); the smallest score minus one is a known
# left point of each (f_l = its size there). Both return (v, per-layer thresholds, floor binding).


def solve_host(
    plan: Plan, budget: float, floors: Tensor | None, start: float
) -> tuple[float, list[float], list[bool]]:
    nl = plan.nlayers
    fl = None if floors is None else floors.tolist()
    search = _HostSearch(0.0, budget, lo_known=False)
    c = _f32(max(start, 0.0))
    iters = 0
    while True:
        f_l, n_l, checked = plan.sums_all(c, check=iters == 0)
        if iters == 0:
            raw = checked
        if fl is None:
            g, slope = sum(f_l), sum(n_l)
        else:
            g = sum(max(f, floor) for f, floor in zip(f_l, fl))
            slope = sum(n for f, n, floor in zip(f_l, n_l, fl) if f > floor)
        if not (math.isfinite(g) and math.isfinite(raw)):
            _raise_non_finite()
        nxt, done = search.step(c, g, slope)
        iters += 1
        if done:
            break
        if iters >= _MAX_ITERS:
            raise _not_converged(iters)
        c = _f32(nxt)
    plan.iterations += iters
    v = search.round_up(nxt)
    thresholds, binding = [v] * nl, [False] * nl
    if fl is None:
        return v, thresholds, binding
    bound = [i for i in range(nl) if f_l[i] < fl[i] * (1 - _FLOOR_RTOL)]
    if not bound:
        return v, thresholds, binding
    subset = plan.subset(bound)
    mins = [math.inf] * len(bound)
    for m, j in zip(plan.layer_min(subset).tolist(), subset[1]):
        mins[j] = min(mins[j], m)
    searches = [_HostSearch(m - 1.0, fl[i], lo_known=True) for m, i in zip(mins, bound)]
    cs = [c] * len(bound)
    f_b, n_b = [f_l[i] for i in bound], [n_l[i] for i in bound]
    pending = list(range(len(bound)))
    iters = 0
    while pending:
        if iters > 0:  # evaluate the layers not yet converged, each at its own threshold
            where = {j: p for p, j in enumerate(pending)}
            sub = ([k for k, j in zip(*subset) if j in where], [where[j] for j in subset[1] if j in where])
            rows = plan.sums([cs[j] for j in pending], sub, check=False).tolist()
            f_b, n_b = [0.0] * len(bound), [0.0] * len(bound)
            for (f, n), pos in zip(rows, sub[1]):
                f_b[pending[pos]] += f
                n_b[pending[pos]] += n
        still = []
        for j in pending:
            nxt, done = searches[j].step(cs[j], f_b[j], n_b[j])
            if done:
                thresholds[bound[j]] = _HostSearch.round_up(nxt)
                binding[bound[j]] = True
            else:
                cs[j] = _f32(nxt)
                still.append(j)
        pending = still
        iters += 1
        if iters >= _MAX_ITERS and pending:
            raise _not_converged(iters)
    plan.iterations += iters - 1
    return v, thresholds, binding


def solve_device(
    plan: Plan, budget: float, floors: Tensor | None, start: float
) -> tuple[float, list[float], list[bool]]:
    device, nl = plan.device, plan.nlayers
    index = torch.tensor(plan.layer, device=device)
    fl = None if floors is None else floors.to(device)

    def per_layer(rows: Tensor, count: int, idx: Tensor) -> tuple[Tensor, Tensor]:
        rows = rows.double()
        if rows.shape[0] == count:
            return rows[:, -2], rows[:, -1]
        zeros = torch.zeros(count, dtype=torch.float64, device=device)
        return zeros.index_add(0, idx, rows[:, -2]), zeros.index_add(0, idx, rows[:, -1])

    zero = torch.zeros((), dtype=torch.float64, device=device)
    search = _DeviceSearch(zero, torch.tensor(budget, dtype=torch.float64, device=device), False)
    c = torch.tensor(max(start, 0.0), dtype=torch.float64, device=device)
    iters, raw = 0, None
    blocks = _blocks(False)
    while True:
        for _ in range(next(blocks)):
            c32 = c.float()
            rows = plan.sums(c32.reshape(1), plan.all, check=raw is None)
            if raw is None:
                raw = rows[:, 0].double().sum()
            f_l, n_l = per_layer(rows, nl, index)
            if fl is None:
                g, slope = f_l.sum(), n_l.sum()
            else:
                g = torch.maximum(f_l, fl).sum()
                slope = torch.where(f_l > fl, n_l, zero).sum()
            c, done = search.step(c32, g, slope)
            iters += 1
        state = torch.stack([done, torch.isfinite(g) & torch.isfinite(raw)]).tolist()  # one sync
        if not state[1]:
            _raise_non_finite()
        if state[0]:
            break
        if iters >= _MAX_ITERS:
            raise _not_converged(iters)
    plan.iterations += iters
    v = float(search.round_up(c))
    thresholds, binding = [v] * nl, [False] * nl
    if fl is None:
        return v, thresholds, binding
    bound = [i for i, short in enumerate((f_l < fl * (1 - _FLOOR_RTOL)).tolist()) if short]
    if not bound:
        return v, thresholds, binding
    subset = plan.subset(bound)
    local = torch.tensor(subset[1], device=device)
    pos = torch.tensor(bound, device=device)
    lo = torch.full((len(bound),), math.inf, dtype=torch.float64, device=device)
    lo = lo.scatter_reduce(0, local, plan.layer_min(subset).double(), "amin") - 1.0
    search = _DeviceSearch(lo, fl[pos], lo_known=True)
    c32 = c32.expand(len(bound))
    f, n = f_l[pos], n_l[pos]
    iters = 0
    blocks = _blocks(False)
    while True:
        for _ in range(next(blocks)):
            if iters > 0:
                f, n = per_layer(plan.sums(c32, subset, check=False), len(bound), local)
            c, done = search.step(c32, f, n)
            c32 = c.float()
            iters += 1
        if bool(done.all()):  # the one host sync of this block
            break
        if iters >= _MAX_ITERS:
            raise _not_converged(iters)
    plan.iterations += iters - 1
    for i, t in zip(bound, search.round_up(c).tolist()):
        thresholds[i], binding[i] = t, True
    return v, thresholds, binding
