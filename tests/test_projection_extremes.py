"""The projection's promise for every finite input, not only training states: scores of large
magnitude (positive and negative, up to the float32 limit), mixed magnitudes, heavy ties,
fractional and tiny budgets, budgets near n, and floors, the four ways of
tests/test_projection.py, against an exact reference (integer and rational arithmetic).

What is promised (README, "The projection"): 0 <= s <= 1; sum(s) <= k (1 + 1e-6); each floor met
to 1e-6 (relative); and, where the budget binds, the sum as close to k from below as a float32
threshold can bring it. These tests check the outputs against the exact projection: elementwise
to 4e-6 plus what the sum's deviation allows (a common threshold moved by d changes each active
score by d), and the sum from below to k (1 - 1e-6) less 2^-22 per score strictly between 0 and 1
(the float32 resolution of the threshold after the search has shifted the scores near it).
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from probmask import kernels, projection
from probmask.projection import project, project_

WAYS = {  # name: (fused, search), as in tests/test_projection.py
    "kernels": (True, "host"),
    "pytorch": (False, "host"),
    "device-path": (False, "device"),
    "device-path-operator": (True, "device"),
}
FLT_MAX = float(np.finfo(np.float32).max)


def _ways():
    """The ways available here (the fused ones need the compiled kernels)."""
    return [w for w, (fused, _) in WAYS.items() if not fused or kernels.available("cpu")]


def _project(way, scores, k, floors=None, sizes=None):
    fused, search = WAYS[way]
    with kernels.use(fused=fused, search=search):
        if sizes is None:
            out, result = project(torch.from_numpy(np.array(scores, dtype=np.float32)), k, floors=floors)
            return out.double().numpy(), result
        parts = np.split(np.array(scores, dtype=np.float32), np.cumsum(sizes)[:-1])
        out, result = project([torch.from_numpy(p.copy()) for p in parts], k, floors=floors)
        return torch.cat(out).double().numpy(), result


# ------------------------------------------------------------------------------ the exact reference
def exact_projection(values, k, sizes=None, floors=None):
    """The Euclidean projection of float32 scores onto {0 <= x <= 1, sum x <= k, layer sums >=
    floors}, exactly: the scores as integers on a common binary scale, thresholds as fractions.
    g(v) = sum_l max(f_l(v), floor_l) is piecewise linear with breakpoints at the scores, the
    scores minus one and each layer's root of f_l = floor_l; v = 0 if g(0) <= k, else g(v) = k;
    a layer with f_l(v) < floor_l gets its own root. Returns the outputs as float64."""
    xs = [Fraction(float(x)) for x in np.asarray(values, dtype=np.float32).reshape(-1)]
    sizes = [len(xs)] if sizes is None else list(sizes)
    floors = [0.0] * len(sizes) if floors is None else [float(f) for f in floors]
    scale = max([x.denominator for x in xs] + [Fraction(k).denominator] + [Fraction(f).denominator for f in floors])
    one, budget = scale, Fraction(k) * scale
    layers, start = [], 0
    for size in sizes:
        layers.append([int(x * scale) for x in xs[start : start + size]])
        start += size
    floor_l = [Fraction(f) * scale for f in floors]

    def f(layer, c):
        return sum(min(max(x - c, 0), one) for x in layer)

    def points(layer):
        return sorted(set(layer) | {x - one for x in layer})

    def crossing(ps, h, t):
        """Where the non-increasing, piecewise-linear h (breakpoints ps, h(ps[0]) >= t) falls to t."""
        lo, hi = 0, len(ps) - 1
        if h(ps[hi]) >= t:
            return Fraction(ps[hi])
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if h(ps[mid]) >= t else (lo, mid)
        a, b = ps[lo], ps[hi]
        ha, hb = h(a), h(b)
        return Fraction(a) + (ha - t) * Fraction(b - a) / (ha - hb)

    roots = [crossing(points(layer), lambda c, layer=layer: f(layer, c), t) if t > 0 else None
             for layer, t in zip(layers, floor_l)]

    def g(c):
        return sum(max(f(layer, c), t) for layer, t in zip(layers, floor_l))

    if g(0) <= budget:
        v = Fraction(0)
    else:
        ps = sorted({p for layer in layers for p in points(layer)} | {r for r in roots if r is not None} | {0})
        v = crossing([p for p in ps if p >= 0], g, budget)
    out = []
    for layer, t, root in zip(layers, floor_l, roots):
        c = v if t == 0 or f(layer, v) >= t else root
        out.extend(float(min(max(x - c, 0), one) / one) for x in layer)
    return np.array(out)


def test_the_reference_on_a_hand_example():
    # two layers: [3, 0.5, 0.25] and [0.1, 0.1]; k = 1.5, floor 0.1 on the second layer
    out = exact_projection([3.0, 0.5, 0.25, 0.1, 0.1], 1.5, sizes=[3, 2], floors=[0.0, 0.1])
    # without the floor v = 0.125 and the second layer is empty; with it that layer keeps 0.1
    # (threshold 0.05) and the first gets 1 + (0.5 - v) + (0.25 - v) = 1.4: v = 0.175
    np.testing.assert_allclose(out, [1.0, 0.325, 0.075, 0.05, 0.05], atol=1e-15)


# ------------------------------------------------------------------------------ the checks
def check(out, expected, k, floors=None, sizes=None):
    """The promise, against the exact projection ``expected``."""
    assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0
    total, want = float(out.sum()), float(expected.sum())
    assert total <= k * (1 + 1e-6), (total, k)
    active = int(((expected > 0) & (expected < 1)).sum())
    active_out = int(((out > 0) & (out < 1)).sum())
    # as close to k (the reference's sum, which is k where the budget binds) as float32 allows
    assert total >= want - 1e-6 * k - 2.0**-22 * max(active, active_out), (total, want, active)
    sizes = [len(out)] if sizes is None else sizes
    floors = [0.0] * len(sizes) if floors is None else floors
    start = 0
    for size, floor in zip(sizes, floors):
        part, ref = out[start : start + size], expected[start : start + size]
        m = int(((ref > 0) & (ref < 1)).sum())
        assert part.sum() >= floor * (1 - 1e-6) - 2.0**-22 * m, (part.sum(), floor)
        slack = 2 * abs(part.sum() - ref.sum()) / max(m, 1) + 2 * abs(total - want) / max(active, 1)
        np.testing.assert_allclose(part, ref, rtol=0, atol=4e-6 + slack)
        start += size


# ------------------------------------------------------------------------------ the reported cases
@pytest.mark.parametrize("way", _ways())
@pytest.mark.parametrize("scale", [1e6, 1e7, 1e10, 1e30, 3e38, -1e7, -1e30])
def test_equal_scores_at_every_scale(way, scale):
    """1000 equal scores and k = 10: every score 0.01 (float32 thresholds near 1e6 are 1/16 apart;
    a negative scale leaves the budget slack: every score 0)."""
    out, result = _project(way, np.full(1000, scale), 10.0)
    want = 0.01 if scale > 0 else 0.0
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-8)
    assert out.sum() <= 10.0 * (1 + 1e-6)
    if scale > 0:
        assert result.threshold == pytest.approx(scale - 0.01, rel=1e-7)


@pytest.mark.parametrize("way", _ways())
def test_heavy_ties_stay_within_the_budget(way):
    """999 scores at 0.5 and one at 2: adjacent float32 thresholds change the sum by 999 ulps of
    0.49, far more than k 1e-6; the sum must be k from below, not 10.0000238."""
    s = np.full(1000, 0.5)
    s[0] = 2.0
    out, _ = _project(way, s, 10.0)
    check(out, exact_projection(s, 10.0), 10.0)
    assert 10.0 * (1 - 1e-6) <= out.sum() <= 10.0 * (1 + 1e-6)


@pytest.mark.parametrize("way", _ways())
def test_random_tie_trials(way):
    """The report's experiment: random scores from a few values (heavy ties), fractional k."""
    rng = np.random.default_rng(5)
    for _ in range(60):
        n = int(rng.integers(50, 2000))
        values = rng.choice([0.0, 0.25, 0.5, 0.5, 0.75, 1.0, 2.0, 0.3], size=n).astype(np.float32)
        k = float(rng.uniform(0.01, 0.99) * n)
        out, _ = _project(way, values, k)
        assert out.sum() <= k * (1 + 1e-6)
        if np.clip(values, 0, 1).sum() > k:  # the budget binds
            assert out.sum() >= k * (1 - 1e-6) - 2.0**-22 * n
        else:
            np.testing.assert_array_equal(out, np.clip(values, 0, 1))


@pytest.mark.parametrize("way", _ways())
def test_near_the_float32_limit(way):
    """Scores at +-FLT_MAX and ordinary ones: no overflow to inf or NaN in s - c or in the sums
    (a float32 sum of the raw scores overflows: that is not a non-finite score)."""
    s = np.concatenate([np.full(300, FLT_MAX), np.full(300, -FLT_MAX), np.linspace(-0.5, 1.5, 400)])
    for k in (0.5, 150.0, 299.5, 310.0):
        out, _ = _project(way, s, k)
        check(out, exact_projection(s, k), k)
    out, _ = _project(way, s, 50.0, floors=[30.0, 10.0, 5.0], sizes=[300, 300, 400])
    check(out, exact_projection(s, 50.0, [300, 300, 400], [30.0, 10.0, 5.0]), 50.0, [30.0, 10.0, 5.0],
          [300, 300, 400])
    with pytest.raises(ValueError, match="NaN or inf"):
        _project(way, np.concatenate([s, [np.inf]]), 10.0)


@pytest.mark.parametrize("way", _ways())
def test_floors_of_huge_negative_layers(way):
    """A layer of scores near -1e30 with a floor of 5: its own threshold is -1e30 - 0.005 (no
    float32 resolves that); the other layer keeps the rest of the budget."""
    s = np.concatenate([np.full(1000, -1e30), np.linspace(0.0, 1.0, 500)])
    sizes, floors = [1000, 500], [5.0, 0.0]
    out, result = _project(way, s, 20.0, floors=floors, sizes=sizes)
    check(out, exact_projection(s, 20.0, sizes, floors), 20.0, floors, sizes)
    np.testing.assert_allclose(out[:1000], 0.005, rtol=0, atol=1e-8)
    assert result.floor_binding.tolist() == [True, False]


# ------------------------------------------------------------------------------ property tests
MAGNITUDES = [1.0, 1e3, 1e6, 2.0**24, 1e7, 1e10, 1e20, 1e30, 3.4e38]


@st.composite
def extreme_layer(draw, n):
    """n float32 scores: ties at a large value, values around it, ordinary ones mixed with it,
    or ordinary ones from a few values (heavy ties)."""
    base = draw(st.sampled_from(MAGNITUDES)) * draw(st.sampled_from([1.0, -1.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["ties", "around", "mixed", "few values"]))
    if kind == "ties":
        s = np.full(n, base)
        s[rng.random(n) < 0.2] = base + draw(st.sampled_from([0.5, 1.0, 2.0, -0.5])) * max(1.0, abs(base) * 2e-7)
    elif kind == "around":
        s = base + rng.uniform(-2.0, 2.0, n) * draw(st.sampled_from([1e-3, 1.0, max(1.0, abs(base) * 1e-7)]))
    elif kind == "mixed":
        s = rng.uniform(-0.25, 1.25, n)
        s[rng.random(n) < draw(st.floats(0.0, 1.0))] = base
    else:
        s = rng.choice([0.0, 0.25, 0.5, 1.0, 2.0, -1.0, 0.3], size=n)
    return np.clip(s, -FLT_MAX, FLT_MAX).astype(np.float32)


@st.composite
def budget(draw, n):
    kind = draw(st.sampled_from(["fraction", "tiny", "near n"]))
    if kind == "tiny":
        return draw(st.floats(1e-3, 1.0))
    if kind == "near n":
        return n * (1 - draw(st.floats(0.0, 0.05)))
    return max(draw(st.floats(0.01, 1.0)) * n, 1e-3)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_extreme_inputs_match_the_exact_projection(data):
    n = data.draw(st.integers(1, 150))
    s = data.draw(extreme_layer(n))
    k = data.draw(budget(n))
    expected = exact_projection(s, k)
    for way in _ways():
        out, _ = _project(way, s, k)
        check(out, expected, k)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_extreme_inputs_with_floors_match_the_exact_projection(data):
    sizes = data.draw(st.lists(st.integers(1, 60), min_size=1, max_size=4))
    s = np.concatenate([data.draw(extreme_layer(n)) for n in sizes])
    n = sum(sizes)
    k = data.draw(budget(n))
    floors = [data.draw(st.one_of(st.just(0.0), st.floats(0.0, min(size, k / len(sizes))))) for size in sizes]
    expected = exact_projection(s, k, sizes, floors)
    for way in _ways():
        out, _ = _project(way, s, k, floors=floors, sizes=sizes)
        check(out, expected, k, floors, sizes)


# ------------------------------------------------------------------------------ the Triton kernel's sums
def test_device_search_over_the_triton_sums(monkeypatch):
    """On CUDA the device search evaluates with the Triton kernel; here its interpreter stands in
    for the C operator (same search, float64 sums), on the reported cases and a floor case."""
    tk = pytest.importorskip("probmask.kernels.triton")
    if not tk.INTERPRET:  # pragma: no cover - conftest.py sets the interpreter without CUDA
        pytest.skip("Triton's interpreter is off")
    monkeypatch.setattr(projection.ops, "clamp_sums", tk.clamp_sums)
    ties = np.full(1000, 0.5)
    ties[0] = 2.0
    cases = [(np.full(1000, 1e7), 10.0, None, None), (ties, 10.0, None, None),
             (np.concatenate([np.full(200, -1e30), np.linspace(0.0, 1.0, 100)]), 20.0, [200, 100], [5.0, 0.0])]
    for s, k, sizes, floors in cases:
        flat = torch.from_numpy(np.array(s, dtype=np.float32))
        project_(flat, k, sizes=sizes, floors=floors, fused=True, search="device")
        check(flat.double().numpy(), exact_projection(s, k, sizes, floors), k, floors, sizes)
