"""Exact projection of scores onto a weighted budget ``sum_i c_i s_i <= B``.

``c_i > 0`` is the cost of keeping element i (for example the multiply-accumulates its weight
costs). The feasible set is ``{s : 0 <= s_i <= 1, sum_i c_i s_i <= B}``, optionally with per-layer
floors ``sum_{i in layer l} c_i s_i >= f_l`` (layers are contiguous runs of ``sizes`` elements).
Two metrics are offered; the metric of the projection decides how the budget is shared out.

Derivation. With multipliers ``v >= 0`` for the budget and ``mu_l >= 0`` for the floors, each
element minimises its own one-dimensional term over ``[0, 1]``:

- ``metric="euclidean"``, ``min 1/2 sum (s_i - s0_i)^2``: the term ``1/2 (s - s0)^2 + (v - mu_l) c s``
  gives ``s_i = clamp(s0_i - t_l c_i, 0, 1)``: each score is pushed down in proportion to its cost.
- ``metric="cost"``, ``min 1/2 sum c_i (s_i - s0_i)^2``: the term ``c (1/2 (s - s0)^2 + (v - mu_l) s)``
  gives ``s_i = clamp(s0_i - t_l, 0, 1)`` (``c_i > 0`` divides out): one uniform shift, the cost
  enters only through the budget. With equal costs this is :func:`probmask.projection.project_`.

Here ``t_l = v - mu_l <= v``. Write ``w_i = c_i`` (euclidean) or 1 (cost) and
``F_l(t) = sum_{i in l} c_i clamp(s0_i - t w_i, 0, 1)``, non-increasing and piecewise linear in t.
Complementary slackness: a layer with ``F_l(v) >= f_l`` has ``mu_l = 0`` and ``t_l = v``; any other
has ``mu_l > 0`` and its own threshold ``t_l < v`` with ``F_l(t_l) = f_l`` (it exists: ``F_l`` tends to
the layer's whole cost, at least ``f_l``, as t falls). So v is 0 where
``G(v) = sum_l max(F_l(v), f_l) <= B`` at ``v = 0`` (the budget does not bind), else the root of
``G(v) = B``; the problem is strictly convex, so this is the projection.

The search. An evaluation at t returns, per layer, ``F_l(t)`` and three slopes: over the elements
with ``0 < u_i < 1`` (the exact slope of the piece, ``u_i = s0_i - t w_i``), with ``u_i > 0`` and with
``u_i < 1``. The sum of ``c_i w_i`` over ``u_i > 0`` bounds how fast F can fall to the right of t, and
over ``u_i < 1`` how fast it can rise to the left, so a step with those slopes never passes the
root. The search takes the Newton step with the exact slope when it stays inside the bracket of
evaluated points (one on each side of the root), else the secant of the bracket, else the safe
step (doubled while one side of the bracket is still open; after two such steps a pass finds a
threshold beyond every breakpoint and closes it); the secant's ends are weighted the Illinois way,
and after two steps that do not halve the bracket it bisects (in the exponent when it spans orders
of magnitude). So every evaluation after the first few either halves the bracket or is followed by
one that does, and any input converges within ``_MAX_EVALS`` (a float64 bracket reaches neighbouring
floats in at most about 120 halvings), else RuntimeError. Measured (``benchmarks/weighted_projection.py``):
training states take 4 evaluations from 0 and 1 warm-started, plus 1-3 passes' worth for layers
whose floor binds; scores spread to 1e6 with costs over six decades, where F is a staircase with few
scores in their linear range, up to 54.

Exactness. Thresholds are float64 and F is summed in float64 from the unrounded values
``clamp(s0_i - t w_i, 0, 1)``, so ties do not make F jump; the written float32 values differ from
them by at most 2^-24 relative, and all are non-negative, so their weighted sum differs from F by
at most 2^-24 relative. The budget's search stops where ``B (1 - 2^-21) <= G <= B (1 + 2^-22)``, a
binding floor's where ``f_l (1 + 2^-23) <= F_l <= f_l (1 + 2^-21)`` (where that window reaches the
layer's whole cost, every score of the layer is set to 1). Guaranteed, for every finite input:
``0 <= s <= 1``; every floor met (``f_l <= sum``, up to the order of a float64 sum: a free layer
has ``F_l >= f_l (1 + 2^-23)``); and where every binding floor is resolved (below),
``sum c_i s_i <= B (1 + 2^-22 + 2^-21 (sum f_l) / B)(1 + 2^-24) < B (1 + 1e-6)``. Where the budget
binds, ``sum c_i s_i >= B (1 - 2^-21)(1 - 2^-24)``, unless no float64 threshold meets the window
(the step of ``t`` moves F by more than the window: scores near ``1e9`` whose threshold has a float64
spacing near ``1e-7``); the threshold is then the neighbouring float64 below the budget, with
``sum c_i s_i < B``, and ``resolved`` is False. An unresolved floor (same cause) takes the
neighbour above its floor, and the budget can then be exceeded by that one float64 step of its
layer's threshold, which moves the layer's sum by at most about ``2^-52 (max|s| + 1) C_l`` (``C_l``
its whole cost): with scores within [-2, 3], by more than 1e-6 only where the budget is below about
``1e-9 C_l``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["METRICS", "WeightedProjectionResult", "project_weighted", "project_weighted_"]

METRICS = ("cost", "euclidean")
_CHUNK = 1 << 16  # elements per chunk: an evaluation's temporaries stay in the cache
_BUDGET_BELOW = 2.0**-21  # the budget's window: B (1 - 2^-21) <= G <= B (1 + 2^-22)
_BUDGET_ABOVE = 2.0**-22
_FLOOR_MIN = 2.0**-23  # a binding floor's window: f (1 + 2^-23) <= F_l <= f (1 + 2^-21)
_FLOOR_MID = 2.0**-22
_FLOOR_MAX = 2.0**-21
_SLACK = 2.0**-40  # float64 summation noise allowed where a floor's window reaches a layer's whole cost
_MAX_EVALS = 400
_STALL = 2  # steps without halving the bracket before a bisection
_BIG = 1e300  # thresholds stay finite


@dataclass(frozen=True)
class WeightedProjectionResult:
    """What a weighted projection did."""

    threshold: float  # v, the budget's multiplier (0 where the budget does not bind)
    layer_thresholds: Tensor  # t_l per layer, float64 (v, or lower where the layer's floor binds)
    floor_binding: Tensor  # bool per layer
    evaluations: float  # search evaluations, in passes over all scores (a layer's counts its share)
    kept_cost: float  # sum c_i s_i as the search evaluated it (float64, before float32 rounding)
    resolved: bool  # False where float64 could not resolve a threshold (see the module docstring)


class _Problem:
    """The scores and costs cut into chunks inside layers; evaluates and applies thresholds."""

    def __init__(self, scores: Tensor, costs: Tensor, sizes: list[int], metric: str) -> None:
        self.scores, self.sizes, self.n = scores, sizes, scores.numel()
        self.costs = costs
        self.euclidean = metric == "euclidean"
        self.cw = costs * costs if self.euclidean else costs  # c_i w_i: the slope of element i
        self.chunks: list[list[tuple[int, int]]] = []
        start = 0
        for size in sizes:
            self.chunks.append([(a, min(a + _CHUNK, start + size)) for a in range(start, start + size, _CHUNK)])
            start += size
        cost_sums = torch.stack([costs[a:b].sum() for ch in self.chunks for a, b in ch]).tolist()
        self.cw_sums = cost_sums if not self.euclidean else torch.stack(
            [self.cw[a:b].sum() for ch in self.chunks for a, b in ch]).tolist()
        self.layer_cost, self.first, k = [], [], 0  # first: the index of a layer's first chunk
        for ch in self.chunks:
            self.layer_cost.append(sum(cost_sums[k : k + len(ch)]))
            self.first.append(k)
            k += len(ch)
        self.evaluations = 0.0

    def _u(self, a: int, b: int, t: float) -> Tensor:
        s = self.scores[a:b].to(torch.float64)
        return torch.add(s, self.costs[a:b], alpha=-t) if self.euclidean else torch.sub(s, t)

    def sums(self, layers: list[int], ts: list[float]) -> list[tuple[float, float, float, float]]:
        """Per layer of ``layers`` at its threshold: (F, slope over 0<u<1, over u>0, over u<1)."""
        rows = []
        for layer, t in zip(layers, ts):
            for (a, b), total in zip(self.chunks[layer], self.cw_sums[self.first[layer]:]):
                x = self._u(a, b, t).clamp_(0.0, 1.0)
                c, cw = self.costs[a:b], self.cw[a:b]
                above, full = torch.ceil(x) @ cw, torch.floor(x) @ cw  # over u > 0; over u >= 1
                rows.append(torch.stack([x @ c, above - full, above, total - full]))
        values = torch.stack(rows).tolist()
        out, k = [], 0
        for layer in layers:
            m = len(self.chunks[layer])
            out.append(tuple(sum(r[j] for r in values[k : k + m]) for j in range(4)))
            k += m
        self.evaluations += sum(self.sizes[i] for i in layers) / self.n
        return out

    def extreme(self, layers: list[int], upper: bool) -> float:
        """A threshold beyond every breakpoint of ``layers``: above it every u <= 0 (``upper``),
        below it every u >= 1. One pass, counted as an evaluation."""
        values = []
        for layer in layers:
            for a, b in self.chunks[layer]:
                s = self.scores[a:b].to(torch.float64) - (0.0 if upper else 1.0)
                q = s / self.costs[a:b] if self.euclidean else s
                values.append(q.max() if upper else q.min())
        self.evaluations += sum(self.sizes[i] for i in layers) / self.n
        x = float(torch.stack(values).max() if upper else torch.stack(values).min())
        pad = abs(x) * 2.0**-40 + 2.0**-1000  # past the rounding of s / c and of s - t c
        return max(min(x + pad if upper else x - pad, _BIG), -_BIG)

    def apply(self, thresholds: list[float]) -> None:
        for layer, t in enumerate(thresholds):
            for a, b in self.chunks[layer]:
                self.scores[a:b].copy_(self._u(a, b, t).clamp_(0.0, 1.0))


Evaluate = Callable[[float], tuple[float, float, float, float]]


def _middle(lo: float, hi: float) -> float:
    """Where to bisect [lo, hi]: its middle, or its geometric middle if it spans orders of magnitude."""
    if hi - lo > 65536.0 and (hi > 4 * lo) and (lo < 4 * hi):
        if lo >= 0:
            return math.sqrt(max(lo, 1e-300) * hi)
        if hi <= 0:
            return -math.sqrt(max(-hi, 1e-300) * -lo)
        return 0.0
    return 0.5 * lo + 0.5 * hi


def _search(evaluate: Evaluate, target: float, window: tuple[float, float], start: float, lower: float,
            below: bool, open_end: Callable[[bool], float]) -> tuple[float, float, bool]:
    """The threshold t where a non-increasing, piecewise-linear F meets ``target``: (t, F(t),
    resolved). Stops where ``target - window[0] <= F <= target + window[1]``, or at ``lower`` with
    F below (the constraint does not bind), or on neighbouring floats ``lo < hi`` (unresolved:
    ``hi`` if ``below``, else ``lo``). ``open_end(upper)`` gives a threshold beyond every breakpoint,
    evaluated where two safe steps have not closed the bracket."""
    lo, f_lo, hi, f_hi = -math.inf, math.nan, math.inf, math.nan
    g_lo, g_hi, side = math.nan, math.nan, 0  # the secant's weights of the ends (Illinois: halved)
    t, prev, width, stalled, safe = start, None, math.inf, 0, 0
    for _ in range(_MAX_EVALS):
        f, exact, right_slope, left_slope = evaluate(t)
        if not math.isfinite(f):
            raise ValueError("the weighted sums are not finite: check the scores and the costs")
        d = f - target
        if -window[0] <= d <= window[1]:
            return t, f, True
        if d > 0:
            lo, f_lo, g_lo = t, f, d
            g_hi, side = (0.5 * g_hi if side > 0 else g_hi), 1  # hi kept twice: its weight halves
        else:
            hi, f_hi, g_hi = t, f, d
            g_lo, side = (0.5 * g_lo if side < 0 else g_lo), -1
            if t <= lower:
                return t, f, True
        if hi <= math.nextafter(lo, math.inf):
            return (hi, f_hi, False) if below else (lo, f_lo, False)
        closed = math.isfinite(lo) and math.isfinite(hi)
        nxt = t + d / exact if exact > 0 else math.nan  # Newton on the current piece
        if not lo < nxt < hi and closed:
            nxt = lo + g_lo / (g_lo - g_hi) * (hi - lo)  # the secant of the bracket (Illinois)
        if not lo < nxt < hi and not closed:  # a side still open: the safe step, never past the root
            safe += 1
            if safe > 2:
                nxt = open_end(d > 0)
            else:
                slope = right_slope if d > 0 else left_slope
                nxt = t + d / slope if slope > 0 else t + (1.0 if d > 0 else -1.0)
                if prev is not None and (prev < t) == (d > 0) and abs(nxt - t) < 2 * abs(t - prev):
                    nxt = t + 2 * (t - prev)  # creeping (scores clamped at 1 inflate the slope): double
        if closed:
            if hi - lo <= 0.5 * width:
                width, stalled = hi - lo, 0
            else:
                stalled += 1
            if stalled >= _STALL or not lo < nxt < hi:
                nxt, width, stalled = _middle(lo, hi), hi - lo, 0
        nxt = min(max(nxt, lower, -_BIG), _BIG)
        if nxt == t:
            nxt = math.nextafter(t, math.inf if d > 0 else -math.inf)
        prev, t = t, nxt
    raise RuntimeError(f"weighted projection did not converge in {_MAX_EVALS} evaluations")


def project_weighted_(
    scores: Tensor,
    costs: Tensor,
    budget: float,
    *,
    sizes: Sequence[int] | None = None,
    floors: Sequence[float] | Tensor | None = None,
    metric: str = "cost",
    start: float = 0.0,
) -> WeightedProjectionResult:
    """Project a flat float32/float64 score tensor in place onto
    ``{0 <= s <= 1, sum c_i s_i <= budget, sum_{i in l} c_i s_i >= floors[l]}``.

    ``costs``: one positive finite cost per score. ``sizes`` splits the scores into contiguous
    layers (needed for ``floors``, which are in units of cost). ``metric``: ``"cost"`` (a uniform
    shift ``clamp(s - t, 0, 1)``) or ``"euclidean"`` (``clamp(s - t c, 0, 1)``). ``start``: where the
    budget's search begins (the previous step's threshold is a good guess). Raises ``ValueError``
    for bad inputs, including NaN/inf scores and a budget below the floors' sum.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: expected one of {METRICS}")
    if scores.dim() != 1 or scores.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"scores must be a flat float32/float64 tensor, got {scores.dtype} {tuple(scores.shape)}")
    if costs.shape != scores.shape or not costs.is_floating_point():
        raise ValueError(f"costs must be floating point and shaped like the scores {tuple(scores.shape)}, "
                         f"got {costs.dtype} {tuple(costs.shape)}")
    n = scores.numel()
    sizes = [n] if sizes is None else [int(x) for x in sizes]
    if sum(sizes) != n or any(x <= 0 for x in sizes):
        raise ValueError(f"sizes {sizes} do not split {n} scores into non-empty layers")
    costs = costs.to(device=scores.device, dtype=torch.float64)
    if not float(costs.min()) > 0:  # NaN fails too; +inf fails the sums below
        raise ValueError("every cost must be positive and finite")
    if not math.isfinite(float(scores.sum(dtype=torch.float64))):  # finite scores sum finitely in float64
        if scores.dtype == torch.float32 or not bool(torch.isfinite(scores).all()):
            raise ValueError("NaN or inf in the scores")
    if not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"budget must be positive and finite, got {budget}")
    if not math.isfinite(start):
        raise ValueError(f"start must be finite, got {start}")
    problem = _Problem(scores, costs, sizes, metric)
    if not math.isfinite(sum(problem.layer_cost)):
        raise ValueError("every cost must be positive and finite (and their sum finite)")
    nl = len(sizes)
    fl = [0.0] * nl if floors is None else torch.as_tensor(floors, dtype=torch.float64).reshape(-1).tolist()
    if len(fl) != nl:
        raise ValueError(f"got {len(fl)} floors for {nl} layers")
    if any(not (0.0 <= f <= c * (1 + 1e-12)) for f, c in zip(fl, problem.layer_cost)):
        raise ValueError("each floor must lie between 0 and its layer's whole cost (every score at 1)")
    fl = [min(f, c) for f, c in zip(fl, problem.layer_cost)]
    if sum(fl) > budget * (1 + 1e-9):
        raise ValueError(f"the floors ask for a cost of {sum(fl):.6g} but the budget is {budget:.6g}")

    seen: dict[float, list[tuple[float, float, float, float]]] = {}
    layers = list(range(nl))

    def budget_sums(t: float) -> tuple[float, float, float, float]:
        rows = seen[t] = problem.sums(layers, [t] * nl)
        free = [r for r, f in zip(rows, fl) if r[0] > f]
        return (sum(max(r[0], f) for r, f in zip(rows, fl)), sum(r[1] for r in free), sum(r[2] for r in free),
                sum(r[3] for r in rows))

    def budget_end(upper: bool) -> float:
        return problem.extreme(layers, upper)

    window = (_BUDGET_BELOW * budget, _BUDGET_ABOVE * budget)
    v, g, resolved = _search(budget_sums, budget, window, max(start, 0.0), 0.0, True, budget_end)
    rows = seen[v]
    thresholds = [v] * nl
    binding = [r[0] < f * (1 + _FLOOR_MIN) and f > 0 for r, f in zip(rows, fl)]
    kept = sum(r[0] for r, b in zip(rows, binding) if not b)
    for layer in (i for i in layers if binding[i]):
        whole, f = problem.layer_cost[layer], fl[layer]
        if f * (1 + _FLOOR_MIN) >= whole:  # the floor's window reaches the whole layer: every score at 1
            thresholds[layer], kept = problem.extreme([layer], upper=False), kept + whole
            continue
        target = min(f * (1 + _FLOOR_MID), whole)
        low, high = f * (1 + _FLOOR_MIN), min(f * (1 + _FLOOR_MAX), whole * (1 + _SLACK))

        def layer_sums(t: float, layer: int = layer) -> tuple[float, float, float, float]:
            return problem.sums([layer], [t])[0]

        def layer_end(upper: bool, layer: int = layer) -> float:
            return problem.extreme([layer], upper)

        t, f_t, ok = _search(layer_sums, target, (target - low, high - target), v, -math.inf, False, layer_end)
        thresholds[layer], kept, resolved = t, kept + f_t, resolved and ok
    problem.apply(thresholds)
    return WeightedProjectionResult(v, torch.tensor(thresholds, dtype=torch.float64),
                                    torch.tensor(binding, dtype=torch.bool), problem.evaluations, kept, resolved)


def project_weighted(
    scores: Tensor | Sequence[Tensor],
    costs: Tensor | Sequence[Tensor],
    budget: float,
    *,
    floors: Sequence[float] | Tensor | None = None,
    metric: str = "cost",
    start: float = 0.0,
) -> tuple[Tensor | list[Tensor], WeightedProjectionResult]:
    """Out of place: one score tensor (any shape, ``costs`` shaped alike) or a list of per-layer
    tensors with their costs (a list of the same shapes)."""
    if isinstance(scores, Tensor):
        if not isinstance(costs, Tensor) or costs.shape != scores.shape:
            raise ValueError("costs must be a tensor shaped like the scores")
        flat = scores.detach().reshape(-1).clone()
        result = project_weighted_(flat, costs.detach().reshape(-1), budget, floors=floors, metric=metric, start=start)
        return flat.view_as(scores), result
    tensors, cost_list = list(scores), [costs] if isinstance(costs, Tensor) else list(costs)
    if not tensors or len(cost_list) != len(tensors) or any(c.shape != t.shape for c, t in zip(cost_list, tensors)):
        raise ValueError("give one cost tensor per score tensor, shaped alike")
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    sizes = [t.numel() for t in tensors]
    flat_costs = torch.cat([c.detach().reshape(-1).to(torch.float64) for c in cost_list])
    result = project_weighted_(flat, flat_costs, budget, sizes=sizes, floors=floors, metric=metric, start=start)
    return [p.view_as(t) for p, t in zip(flat.split(sizes), tensors)], result
