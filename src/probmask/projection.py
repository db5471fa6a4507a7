"""Exact Euclidean projection of all scores onto the global budget.

The feasible set is ``{s : 0 <= s_i <= 1, sum_i s_i <= k}``, optionally with per-layer floors
``sum_{i in layer l} s_i >= floor_l``. Its projection has the closed form
``s_i <- clamp(s_i - c_l, 0, 1)`` where ``c_l = v`` for every layer whose floor does not bind and
``c_l < v`` (its own threshold, meeting the floor exactly) for layers whose floor binds.

``f(c) = sum_i clamp(s_i - c, 0, 1)`` is monotone and piecewise linear. We find its root with
Newton steps that use the count ``#{i : s_i > c}`` as slope. That slope is never smaller than the
true one, so a step taken from the left of the root never passes it (``f`` lies above the
tangent line on the right), the iteration is monotone from the left, and it stops when ``f``
meets the budget to the accuracy of its float32 sum (2^-21, relative) or when its bracket is
down to neighbouring float32 thresholds: the answer is exact to float32, not to a tolerance.
Steps from the right of the root and float32 rounding are safeguarded by that bracket.

Where float32 cannot resolve the threshold (large scores: near 1e6 neighbouring thresholds are 1/16
apart; heavy ties: a step of the threshold moves every tied score at once), the scores of that
problem are shifted in place by a float32 ``r`` next to the threshold (exact for every score that
ends strictly between 0 and 1 once ``|r| >= 4``, by Sterbenz's lemma; else within 2^-24) and a
residual threshold is searched again; the output is then ``clamp((s - r) - c', 0, 1)``, the same
clamp with a finer threshold. What this guarantees for every finite input, with every code path
(:mod:`probmask.threshold_search` has the details): ``0 <= s <= 1``; ``sum(s) <= k (1 + 1e-6)``
(``k (1 + 2^-21)`` as the search sums, plus the rounding of that sum); where the budget binds,
``sum(s) >= k (1 - 2^-21)`` as the search sums (``k (1 - 2^-20)`` with binding floors), or else the
sum is below ``k`` and one float32 step down of the (shifted) threshold would put it above the upper
tolerance (ties the float32 outputs cannot split); binding floors met to 2^-22 (relative; from above
where float32 cannot), the other layers at least ``floor (1 - 1e-6)``. Normal training states (scores near [0, 1]) meet the budget without any shift: no
extra pass.

Floors enter the same iteration: the budget equation is ``sum_l max(f_l(v), floor_l) = k``
(a layer held at its floor contributes the floor and no slope), so one Newton iteration with
per-layer sums finds v; the layers short of their floor at v then solve for their own
thresholds together, in one vectorised iteration over those layers only.

On an accelerator the iterations run in blocks without any host synchronisation; one
synchronisation per block checks convergence (and NaN/inf). On the CPU, where reading a result
is free, convergence is checked after every step and the scalar arithmetic runs in Python floats.
An evaluation is the fused operator ``probmask::clamp_sums`` (:mod:`probmask.kernels`: one read of
the scores returning every sum; on the CPU the search calls its C implementation directly, since
the dispatcher's overhead would exceed an evaluation of a small model's scores), or PyTorch
operations that go through the scores in cache-sized chunks on the CPU instead of through a
full-size temporary.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from probmask import kernels
from probmask import threshold_search as ts
from probmask.kernels import cpu, ops

__all__ = ["ProjectionResult", "project", "project_", "work_buffer"]

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
    fused: bool | None = None,
    search: str | None = None,
) -> ProjectionResult:
    """Project a flat score tensor in place onto ``{0<=s<=1, sum s<=budget, layer sums>=floors}``.

    ``sizes`` splits the flat tensor into layers (needed for ``floors``). ``start`` warm-starts
    the search (the previous step's threshold is a good guess). ``buffer`` is an optional kept
    work tensor (see :func:`work_buffer`; a tensor shaped like ``scores`` also works), so that a
    step allocates nothing. ``fused`` and ``search`` override :func:`probmask.kernels.settings`.
    Raises ``ValueError`` on NaN/inf scores, a budget below the floors, or a non-positive budget.

    Any finite scores are projected (see the module docstring for what is guaranteed): where
    float32 cannot resolve a threshold, the scores of that layer set are shifted by a float32
    ``r`` first, and the reported thresholds are ``r + c'`` (float64).
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
    setting = kernels.settings()
    fused = setting.fused if fused is None else fused
    fused = fused and kernels.available(scores.device.type) and kernels.takes(scores)
    search = setting.search if search is None else search
    host = scores.device.type == "cpu" if search == "auto" else search == "host"
    plan = _Plan(scores, sizes, buffer, fused=fused, host=host)
    run = _HostRun(plan) if host else _DeviceRun(plan)
    v, residual, thresholds, binding = ts.solve(run, plan, float(budget), floor_t if floors is not None else None,
                                                float(start))
    plan.apply(residual)
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
    return torch.empty(min(n, _CPU_CHUNK) if scores.device.type == "cpu" else n, dtype=scores.dtype,
                       device=scores.device)


class _Plan:
    """The scores cut into chunks, each inside one layer, and how to evaluate the sums over them.

    ``host``: results come back as Python floats and chunks have at most ``_CPU_CHUNK`` elements
    that share one small work buffer (an evaluation by PyTorch operations reads the scores once and
    the rest stays in the cache). Otherwise a chunk is a whole layer with its own view of a
    full-size buffer and results stay on the device. ``fused``: evaluations are the
    ``probmask::clamp_sums`` operator (on the CPU in host mode: its C implementation, called
    directly, one read of each layer) and need no work buffer.
    """

    def __init__(self, scores: Tensor, sizes: list[int], buffer: Tensor | None, *, fused: bool, host: bool) -> None:
        self.device = scores.device
        self.scores = scores
        self.host = host
        self.fused = fused
        self.direct = fused and host and scores.device.type == "cpu"  # the C implementation, no dispatcher
        self.nlayers = len(sizes)
        self.n = scores.numel()
        self.sizes = sizes
        self.starts = [0, *itertools.accumulate(sizes[:-1])]
        self.layers = list(scores.split(sizes)) if self.direct else []
        chunk = _CPU_CHUNK if host and not fused else max(sizes)  # fused evaluations need no chunks
        need = 0 if fused else min(chunk, scores.numel()) if host else scores.numel()
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
                w0 = 0 if host else offset + lo
                self.work.append(work[w0 : w0 + length] if not fused else work[:0])
                self.layer.append(i)
            offset += size
        self.all = self.subset(list(range(self.nlayers)))
        self.iterations = 0  # evaluations done so far
        # On the host, passes with one threshold for all layers go through packed chunks: runs of
        # whole small layers (or pieces of a large one) of up to ``chunk`` elements, one
        # subtract/clamp/ceil per pack and a sum per layer piece. Fewer operations for models
        # made of many small layers.
        self.packs: list[tuple[Tensor, Tensor, list[tuple[int, int, int]]]] = []
        if host and not fused:
            start, length, pieces = 0, 0, []
            for src, layer in zip(self.src, self.layer):
                if length and length + src.numel() > chunk:
                    self.packs.append((scores[start : start + length], work[:length], pieces))
                    start, length, pieces = start + length, 0, []
                pieces.append((layer, length, length + src.numel()))
                length += src.numel()
            self.packs.append((scores[start : start + length], work[:length], pieces))

    def subset(self, layers: list[int]) -> tuple[list[int], list[int]]:
        """The chunks of ``layers`` (ascending) and each chunk's position in ``layers``."""
        where = {layer: j for j, layer in enumerate(layers)}
        chunks = [k for k, i in enumerate(self.layer) if i in where]
        return chunks, [where[self.layer[k]] for k in chunks]

    def sums(self, thresholds: Any, subset: tuple[list[int], list[int]], check: bool) -> Tensor:
        """Per chunk of ``subset``: [raw sum,] sum clamp(s - c, 0, 1) and #{s > c}, stacked.

        ``thresholds`` holds one float32 threshold, or one per layer of the subset (Python floats
        on the CPU, a device tensor elsewhere). The raw sums (with ``check``) show NaN and +-inf,
        which clamping hides. No host synchronisation.
        """
        chunks, local = subset
        scalar = len(thresholds) == 1
        if self.direct:
            rows = []
            for j, k in enumerate(chunks):
                f, n, raw = cpu.clamp_sums(self.src[k], thresholds[0] if scalar else thresholds[local[j]])
                rows.append([raw, f, n] if check else [f, n])
            return torch.tensor(rows, dtype=torch.float64).view(len(chunks), -1)
        if self.fused:
            if self.host:
                thresholds = torch.tensor(thresholds, dtype=torch.float32, device=self.device)
            layers = [self.layer[k] for k in chunks]  # fused: every chunk is a whole layer
            rows = ops.clamp_sums(self.scores, [self.starts[i] for i in layers], [self.sizes[i] for i in layers],
                                  thresholds.float())
            return rows[:, [2, 0, 1]] if check else rows[:, :2]
        out = []
        for j, k in enumerate(chunks):
            src, work = self.src[k], self.work[k]
            if check:
                out.append(src.sum())
            torch.sub(src, thresholds[0] if scalar else thresholds[local[j]], out=work).clamp_(0.0, 1.0)
            out.append(work.sum())
            out.append(work.ceil_().sum())  # 1 where s > c, else 0: faster than count_nonzero on CPU
        return torch.stack(out).view(len(chunks), -1)

    def sums_all(self, c: float, check: bool) -> tuple[list[float], list[float], float]:
        """CPU: per-layer sum clamp(s - c, 0, 1) and #{s > c} at one threshold, and (with
        ``check``) the raw sum of the scores (clamping hides +-inf; NaN shows there too)."""
        if self.direct:
            rows = [cpu.clamp_sums(layer, c) for layer in self.layers]
            return [r[0] for r in rows], [r[1] for r in rows], sum(r[2] for r in rows)
        if self.fused:
            all_rows = ops.clamp_sums(self.scores, self.starts, self.sizes, torch.tensor([c], device=self.device))
            f, n, raw = all_rows.T.tolist()
            return f, n, sum(raw)
        out = []
        for src, work, pieces in self.packs:
            if check:
                out.append(src.sum())
            torch.sub(src, c, out=work).clamp_(0.0, 1.0)
            out.extend(work.sum() if len(pieces) == 1 else work[a:b].sum() for _, a, b in pieces)
            work.ceil_()  # 1 where s > c, else 0: summing it is faster than count_nonzero on CPU
            out.extend(work.sum() if len(pieces) == 1 else work[a:b].sum() for _, a, b in pieces)
        values = torch.stack(out).tolist()
        f, n = [0.0] * self.nlayers, [0.0] * self.nlayers
        raw, pos = 0.0, 0
        for _, _, pieces in self.packs:
            if check:
                raw += values[pos]
                pos += 1
            m = len(pieces)
            for j, (layer, _, _) in enumerate(pieces):
                f[layer] += values[pos + j]
                n[layer] += values[pos + m + j]
            pos += 2 * m
        return f, n, raw

    def layer_range(self, subset: tuple[list[int], list[int]]) -> Tensor:
        """The smallest and the largest score of each chunk of ``subset``, [chunks, 2] (no sync)."""
        return torch.stack([torch.stack(torch.aminmax(self.src[k])) for k in subset[0]])

    def finite(self) -> bool:
        """Whether every score is finite (one pass; only when a raw sum was not)."""
        return bool(torch.isfinite(self.scores).all())

    def shift(self, layers: list[int], amounts: list[float]) -> None:
        """In place: s <- fl32(s - r) over each of ``layers`` with its float32 ``r`` (the search's
        refinement: exact for every score within a factor 2 of r)."""
        for layer, r in zip(layers, amounts):
            if r != 0.0:
                a = self.starts[layer]
                self.scores[a : a + self.sizes[layer]].sub_(r)

    def apply(self, thresholds: list[float]) -> None:
        """In place: s <- clamp(s - c_l, 0, 1) with each layer's threshold."""
        if self.packs and all(t == thresholds[0] for t in thresholds):
            for src, _, _ in self.packs:
                src.sub_(thresholds[0]).clamp_(0.0, 1.0)
            return
        for src, i in zip(self.src, self.layer):
            src.sub_(thresholds[i]).clamp_(0.0, 1.0)


# ------------------------------------------------------------------------------ running the searches
class _HostRun:
    """Runs :mod:`probmask.threshold_search`'s searches over the plan's sums in Python floats, a
    check after every evaluation (the CPU)."""

    def __init__(self, plan: _Plan) -> None:
        self.plan = plan

    def _per_layer(self, thresholds: list[float], subset: tuple[list[int], list[int]], m: int) -> tuple[list, list]:
        f, n = [0.0] * m, [0.0] * m
        for (fk, nk), p in zip(self.plan.sums(thresholds, subset, check=False).tolist(), subset[1]):
            f[p] += fk
            n[p] += nk
        return f, n

    def layer_sums(self, layers: list[int], c: float) -> tuple[list[float], list[float]]:
        self.plan.iterations += 1
        return self._per_layer([c], self.plan.subset(layers), len(layers))

    def solve(self, layers: list[int], shared: bool, specs: list[ts._Spec], starts: list[float],
              first: tuple[list, list] | None = None, fls: list[float] | None = None, check: bool = False):
        """Outcomes (answer, bound, resolved, lo, hi) of one problem over ``layers`` (shared) or
        of one per layer; for a shared problem also its last point and the per-layer (f, count)
        there. ``first``: (f, count) per problem at ``starts`` already; ``fls``: the floors of a
        shared problem's layers; ``check``: look for NaN and inf at the first pass."""
        plan = self.plan
        searches = [ts._HostSearch(*s[:8]) for s in specs]
        cs, pending, outs, last, evaluations = list(starts), list(range(len(specs))), [None] * len(specs), None, 0
        whole = shared and len(layers) == plan.nlayers
        subset = plan.subset(layers) if shared and not whole else None
        f, n = first if first is not None else (None, None)
        while pending:
            if f is None:
                evaluations += 1
                if whole:  # the packed pass over all layers
                    f, n, raw = plan.sums_all(cs[0], check=check and evaluations == 1)
                    if check and evaluations == 1 and not math.isfinite(raw):
                        ts._check_raw(plan)
                elif shared:
                    f, n = self._per_layer([cs[0]], subset, len(layers))
                else:  # the layers not yet done, each at its own threshold
                    f, n = [math.nan] * len(layers), [math.nan] * len(layers)
                    sums = self._per_layer([cs[j] for j in pending], plan.subset([layers[j] for j in pending]), len(pending))
                    for j, fj, nj in zip(pending, *sums):
                        f[j], n[j] = fj, nj
            if shared:
                last = (cs[0], f, n)
                if fls is None:
                    steps = [(0, sum(f), sum(n), 0.0)]
                else:
                    steps = [(0, sum(max(a, b) for a, b in zip(f, fls)), sum(k for a, k, b in zip(f, n, fls) if a > b),
                              ts._FLOOR_SUM_RTOL * sum(b for a, b in zip(f, fls) if a < b))]
                if not math.isfinite(steps[0][1]):
                    ts._raise_non_finite()
            else:
                steps = [(j, f[j], n[j], 0.0) for j in pending]
            still = []
            for j, g, slope, held in steps:
                nxt, done = searches[j].step(cs[j], g, slope, held)
                if done:
                    outs[j] = (nxt, searches[j].bound, searches[j].resolved, searches[j].lo, searches[j].hi)
                else:
                    cs[j] = nxt
                    still.append(j)
            pending, f = still, None
            if evaluations >= ts._MAX_ITERS and pending:
                raise ts._not_converged(evaluations)
        plan.iterations += evaluations
        return outs, last


class _DeviceRun(_HostRun):
    """Runs the searches in device tensors: blocks of steps, one host synchronisation per block."""

    def layer_sums(self, layers: list[int], c: float) -> tuple[list[float], list[float]]:
        plan = self.plan
        plan.iterations += 1
        subset = plan.subset(layers)
        rows = plan.sums(torch.tensor([c], dtype=torch.float32, device=plan.device), subset, check=False)
        return tuple(torch.stack(_per_layer(rows, len(layers), torch.tensor(subset[1], device=plan.device))).tolist())

    def solve(self, layers: list[int], shared: bool, specs: list[ts._Spec], starts: list[float],
              first: tuple[list, list] | None = None, fls: list[float] | None = None, check: bool = False):
        plan, device = self.plan, self.plan.device
        as_t = lambda xs: torch.tensor(xs, dtype=torch.float64, device=device)  # noqa: E731
        lo, target, size, hi = (as_t([s[k] for s in specs]) for k in (0, 1, 3, 5))
        tol = None if specs[0].tol is None else as_t([s.tol for s in specs])
        upper = None if specs[0].upper is None else as_t([s.upper for s in specs])
        search = ts._DeviceSearch(lo, target, specs[0].lo_known, size, specs[0].below, hi, tol, upper)
        m = len(layers)
        whole = shared and m == plan.nlayers
        subset = plan.all if whole else plan.subset(layers)
        index = torch.tensor(plan.layer if whole else subset[1], device=device)
        fls_t = None if fls is None else as_t(fls)
        zero = torch.zeros((), dtype=torch.float64, device=device)
        c32 = as_t(starts).float()
        f, n = (as_t(first[0]), as_t(first[1])) if first is not None else (None, None)
        raw, held, iters, blocks = None if check else zero, None, 0, ts._blocks(False)
        while True:
            for _ in range(next(blocks)):
                if f is None:
                    rows = plan.sums(c32, subset, check=raw is None)
                    if raw is None:
                        raw = rows[:, 0].double().sum()
                    f, n = _per_layer(rows, m, index)
                    iters += 1
                f_l, n_l = f, n
                if shared and fls_t is not None:
                    held = ts._FLOOR_SUM_RTOL * torch.where(f < fls_t, fls_t, zero).sum(0, keepdim=True)
                    f, n = torch.maximum(f, fls_t).sum(0, keepdim=True), torch.where(f > fls_t, n, zero).sum(0, keepdim=True)
                elif shared:
                    f, n = f.sum(0, keepdim=True), n.sum(0, keepdim=True)
                g = f
                c, done = search.step(c32, f, n, held)
                c32, f = c.float(), None
            state = torch.stack([done.all(), torch.isfinite(g).all(), torch.isfinite(raw), search.wide()]).tolist()
            if not state[1]:
                ts._raise_non_finite()
            if not state[2]:
                ts._check_raw(plan)
            if state[0]:
                break
            if iters >= ts._MAX_ITERS:
                raise ts._not_converged(iters)
            search.geometric = search.geometric or state[3]
        plan.iterations += iters
        outs = search.outcome()  # one sync
        last = (outs[0][5], *torch.stack([f_l, n_l]).tolist()) if shared and fls is not None else None
        return [o[:5] for o in outs], last


def _per_layer(rows: Tensor, count: int, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Per layer (f, count) from the rows of its chunks (``idx``: each chunk's layer position)."""
    rows = rows.double()
    if rows.shape[0] == count:
        return rows[:, -2], rows[:, -1]
    zeros = torch.zeros(count, dtype=torch.float64, device=rows.device)
    return zeros.index_add(0, idx, rows[:, -2]), zeros.index_add(0, idx, rows[:, -1])
