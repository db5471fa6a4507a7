"""The weighted projection against a brute-force float64 reference (bisection to machine precision
on the KKT form), its guarantees, its evaluation counts and its errors."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from probmask.projection import project
from probmask.weighted_projection import METRICS, project_weighted, project_weighted_


def _bisect(f, target, lo, hi):
    """The root of a non-increasing f with f(lo) >= target > f(hi), to neighbouring floats."""
    for _ in range(3000):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        if f(mid) >= target:
            lo = mid
        else:
            hi = mid
    return hi


def reference(s, c, budget, sizes, floors, metric):
    """Per-layer thresholds and outputs (float64) of the projection, by bisection: t_l = min(v, tau_l)
    with v the smallest v >= 0 where sum_l max(F_l(v), f_l) <= budget, and F_l(tau_l) = f_l."""
    s, c = np.asarray(s, np.float64), np.asarray(c, np.float64)
    w = c if metric == "euclidean" else np.ones_like(c)
    cuts = np.cumsum([0, *sizes])
    parts = [slice(a, b) for a, b in zip(cuts[:-1], cuts[1:])]
    fl = np.zeros(len(sizes)) if floors is None else np.asarray(floors, np.float64)

    def f_layer(p, t):
        return float(c[p] @ np.clip(s[p] - t * w[p], 0.0, 1.0))

    def g(v):
        return sum(max(f_layer(p, v), f) for p, f in zip(parts, fl))

    v = 0.0 if g(0.0) <= budget else _bisect(g, budget, 0.0, float(np.max(s / w)) + 1.0)
    ts = []
    for p, f in zip(parts, fl):
        if f_layer(p, v) >= f:
            ts.append(v)
        else:
            ts.append(_bisect(lambda t, p=p: f_layer(p, t), f, float(np.min((s[p] - 1.0) / w[p])) - 1.0, v))
    t_elem = np.repeat(ts, sizes)
    return np.array(ts), np.clip(s - t_elem * w, 0.0, 1.0)


def kept(out, c, sizes):
    """Per-layer sum c_i s_i of the written scores, in float64."""
    return [float(o.double() @ k.double()) for o, k in zip(out.split(sizes), c.split(sizes))]


score_values = st.one_of(st.floats(-0.5, 1.5, width=32), st.sampled_from([0.0, 0.25, 0.5, 1.0]))
cost_values = st.one_of(st.floats(-3, 6).map(lambda e: 10.0**e), st.just(1.0))


@st.composite
def problems(draw, with_floors):
    nl = draw(st.integers(1, 4))
    sizes = draw(st.lists(st.integers(1, 40), min_size=nl, max_size=nl))
    n = sum(sizes)
    s = torch.tensor(draw(st.lists(score_values, min_size=n, max_size=n)), dtype=torch.float32)
    layer_costs = draw(st.booleans())  # one cost per layer (MACs of its weights) or per element
    if layer_costs:
        per = draw(st.lists(cost_values, min_size=nl, max_size=nl))
        c = torch.cat([torch.full((k,), x, dtype=torch.float64) for k, x in zip(sizes, per)])
    else:
        c = torch.tensor(draw(st.lists(cost_values, min_size=n, max_size=n)), dtype=torch.float64)
    whole = [float(x.sum()) for x in c.split(sizes)]
    floors = None
    if with_floors:
        floors = [x * draw(st.sampled_from([0.0, 0.01, 0.3, 0.9, 1.0])) for x in whole]
    low = sum(floors) if floors else 0.0
    frac = draw(st.floats(0.0, 1.2))
    budget = low + frac * (sum(whole) - low) + (1e-3 if low == 0 else 0.0)
    return s, c, sizes, floors, max(budget, 1e-3)


def check_against_reference(s, c, sizes, floors, budget, metric):
    out = s.clone()
    r = project_weighted_(out, c, budget, sizes=sizes, floors=floors, metric=metric)
    assert r.resolved
    assert bool(((out >= 0) & (out <= 1)).all())
    sums = kept(out, c, sizes)
    total = sum(sums)
    assert total <= budget * (1 + 1e-6)
    fl = floors or [0.0] * len(sizes)
    for got, f in zip(sums, fl):
        assert got >= f * (1 - 1e-14)  # float64 sums of the same values in another order
    ts_ref, ref = reference(s.numpy(), c.numpy(), budget, sizes, floors, metric)
    if ts_ref.max() > 0 and r.threshold > 0:  # the budget binds: met from below to 2^-20
        assert total >= budget * (1 - 2.0**-20)
    # The exact solution moves monotonically with the budget and the floors: the output lies between
    # the references with the budget 2^-19 lower and higher (floors raised by 2^-20 for the upper).
    whole = [float(x.sum()) for x in c.split(sizes)]
    _, low = reference(s.numpy(), c.numpy(), budget * (1 - 2.0**-19), sizes, floors, metric)
    up_floors = None if floors is None else [min(f * (1 + 2.0**-20), x) for f, x in zip(floors, whole)]
    _, high = reference(s.numpy(), c.numpy(), budget * (1 + 2.0**-19), sizes, up_floors, metric)
    o = out.double().numpy()
    # float32 rounding; and an element whose cost is below the resolution of the float64 sums
    # (its whole range moves a sum by less than a few of its ulps) is not resolved by any sum
    atol = 2.0**-22 + 64 * np.finfo(np.float64).eps * float(c.sum()) / c.numpy()
    assert np.all(o >= low - atol) and np.all(o <= high + atol)
    ref_sums = [float(x @ k) for x, k in zip(np.split(ref, np.cumsum(sizes)[:-1]), np.split(c.numpy(), np.cumsum(sizes)[:-1]))]
    for got, want in zip(sums, ref_sums):
        assert abs(got - want) <= 2.0**-18 * budget + 1e-9 * abs(want)
    return r


@pytest.mark.parametrize("metric", METRICS)
@settings(max_examples=100, deadline=None)
@given(problem=problems(with_floors=False))
def test_matches_the_reference_without_floors(metric, problem):
    s, c, sizes, _, budget = problem
    check_against_reference(s, c, sizes, None, budget, metric)


@pytest.mark.parametrize("metric", METRICS)
@settings(max_examples=100, deadline=None)
@given(problem=problems(with_floors=True))
def test_matches_the_reference_with_floors(metric, problem):
    s, c, sizes, floors, budget = problem
    r = check_against_reference(s, c, sizes, floors, budget, metric)
    assert r.floor_binding.numel() == len(sizes)


def training_state(seed, costs_per_layer, sizes, keep=0.1):
    """An Adam-like step away from a projected state: per layer a density, scores at 1, in (0, 1) and
    at 0, projected onto a cost budget, then every score moved by about lr = 6e-3 with a positive
    mean (the sum rises above the budget, as the loss gradient pushes it)."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for size in sizes:
        d = min(1.0, keep * math.exp(float(torch.randn((), generator=g))))
        u = torch.rand(size, generator=g)
        parts.append(torch.where(u < 0.7 * d, 1.0, torch.where(u < 1.3 * d, torch.rand(size, generator=g), 0.0)))
    s = torch.cat(parts)
    c = torch.cat([torch.full((k,), float(x), dtype=torch.float64) for k, x in zip(sizes, costs_per_layer)])
    budget = 0.97 * float(s.double() @ c)
    s += 6e-3 * (0.3 + torch.randn(s.shape, generator=g)).clamp(-1, 1)
    return s, c, budget


MACS = {  # cost of one weight per layer: output positions of convolutions, 1 for linear layers
    "resnet-like": ([1024, 1024, 256, 256, 64, 64, 1], [432, 9216, 18432, 36864, 73728, 147456, 640]),
    "ratio-1e6": ([1e6, 1e4, 100, 1], [2000, 5000, 20000, 50000]),
}


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("model", list(MACS))
@pytest.mark.parametrize("with_floors", [False, True])
def test_training_states_take_at_most_ten_evaluations(metric, model, with_floors):
    costs, sizes = MACS[model]
    for seed in range(3):
        s, c, budget = training_state(seed, costs, sizes)
        floors = None
        if with_floors:  # a floor of 1% of each layer's whole cost: some of them bind
            floors = [0.01 * float(x.sum()) for x in c.split(sizes)]
        out = s.clone()
        r = project_weighted_(out, c, budget, sizes=sizes, floors=floors, metric=metric)
        assert r.evaluations <= 10, (seed, r)
        total = sum(kept(out, c, sizes))
        assert budget * (1 - 2.0**-20) <= total <= budget * (1 + 1e-6)


@pytest.mark.parametrize("metric", METRICS)
def test_any_input_converges_within_the_documented_bound(metric):
    """Scores far outside [0, 1] (the safe steps creep; the bracket closes by one extreme pass)."""
    g = torch.Generator().manual_seed(1)
    for scale in (1.0, 1e3, 1e6):
        s = (torch.randn(5000, generator=g) * scale).float()
        c = 10.0 ** (6 * torch.rand(5000, generator=g, dtype=torch.float64))
        for frac in (1e-6, 0.01, 0.5):
            out = s.clone()
            budget = frac * float(c @ s.double().clamp(0, 1))
            r = project_weighted_(out, c, budget, metric=metric)
            assert r.evaluations < 64  # step-like F (few scores in their linear range): measured <= 54
            assert float(out.double() @ c) <= budget * (1 + 1e-6)
            if r.resolved:
                assert float(out.double() @ c) >= budget * (1 - 2.0**-20)


@pytest.mark.parametrize("metric", METRICS)
def test_budget_not_binding_is_the_clamp(metric):
    s = torch.tensor([-0.5, 0.2, 0.7, 1.5])
    c = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    out, r = project_weighted(s, c, 100.0, metric=metric)
    assert torch.equal(out, s.clamp(0, 1)) and r.threshold == 0.0 and r.evaluations == 1


def test_cost_metric_with_equal_costs_is_the_projection():
    g = torch.Generator().manual_seed(3)
    sizes = [3000, 500, 20]
    s = torch.rand(sum(sizes), generator=g) * 1.4 - 0.2
    for cost in (1.0, 37.0):
        c = torch.full_like(s, cost, dtype=torch.float64)
        for k, floors in ((800.0, None), (800.0, [10.0, 100.0, 15.0])):
            ours, r = project_weighted(list(s.split(sizes)), list(c.split(sizes)), k * cost,
                                       floors=None if floors is None else [f * cost for f in floors])
            theirs, r0 = project(list(s.split(sizes)), k, floors=floors)
            torch.testing.assert_close(torch.cat(ours), torch.cat(theirs), rtol=0, atol=1e-5)
            assert r.floor_binding.tolist() == r0.floor_binding.tolist()


@pytest.mark.parametrize("metric", METRICS)
def test_equal_costs_give_one_threshold_scaled_by_the_cost(metric):
    """With one cost for all, both metrics keep the same scores; the euclidean threshold is the
    cost metric's divided by the cost."""
    s = torch.rand(1000, generator=torch.Generator().manual_seed(4))
    c = torch.full((1000,), 8.0, dtype=torch.float64)
    a, ra = project_weighted(s, c, 8.0 * 300, metric="cost")
    b, rb = project_weighted(s, c, 8.0 * 300, metric="euclidean")
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert rb.threshold == pytest.approx(ra.threshold / 8.0, rel=1e-5)


def test_the_metrics_allocate_differently():
    """Two layers of equal scores, one 1000x as costly per element: the cost metric shifts both by the
    same amount, the euclidean metric prunes the costly layer far harder."""
    s = torch.full((200,), 0.6)
    c = torch.cat([torch.ones(100), torch.full((100,), 1000.0)]).double()
    budget = 0.5 * float(s.double() @ c)
    for metric in METRICS:
        out, r = project_weighted(list(s.split(100)), list(c.split(100)), budget, metric=metric)
        cheap, costly = float(out[0].mean()), float(out[1].mean())
        if metric == "cost":
            assert cheap == pytest.approx(costly, abs=1e-6)
        else:
            assert cheap > 0.59 and costly < 0.31
        assert sum(float(o.double() @ k) for o, k in zip(out, c.split(100))) == pytest.approx(budget, rel=1e-6)


@pytest.mark.parametrize("metric", METRICS)
def test_huge_cost_ratios(metric):
    g = torch.Generator().manual_seed(5)
    s = torch.rand(4000, generator=g)
    c = torch.cat([torch.full((2000,), 1e-3), torch.full((2000,), 1e3)]).double()
    for frac in (0.9, 0.1, 1e-4):
        budget = frac * float(s.double() @ c)
        out, r = project_weighted(s, c, budget, metric=metric)
        total = float(out.double() @ c)
        assert budget * (1 - 2.0**-20) <= total <= budget * (1 + 1e-6) and r.resolved
        floors = [0.5 * float(c[:2000].sum()), 0.0]
        out, r = project_weighted(list(s.split(2000)), list(c.split(2000)), budget, floors=floors, metric=metric)
        assert float(out[0].double() @ c[:2000]) >= floors[0]
        assert float(torch.cat(out).double() @ c) <= budget * (1 + 1e-6)


def test_floors_bind_even_when_the_budget_does_not():
    s = torch.tensor([0.1, 0.1, 0.9, 0.9])
    c = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    out, r = project_weighted([s[:2], s[2:]], [c[:2], c[2:]], 10.0, floors=[1.0, 0.0])
    assert r.threshold == 0.0 and r.floor_binding.tolist() == [True, False]
    assert float(out[0].double().sum()) >= 1.0 and float(out[0].double().sum()) <= 1.0 + 1e-6
    assert r.layer_thresholds[0] < 0
    out, r = project_weighted([s[:2], s[2:]], [c[:2], c[2:]], 10.0, floors=[2.0, 0.0])  # the whole layer
    assert out[0].tolist() == [1.0, 1.0]


def test_warm_start_and_float64_scores():
    s, c, budget = training_state(7, *MACS["resnet-like"])
    cold = s.clone()
    r = project_weighted_(cold, c, budget, sizes=MACS["resnet-like"][1])
    again, _ = training_state(7, *MACS["resnet-like"])[0], None
    warm = again.double()
    r2 = project_weighted_(warm, c, budget, sizes=MACS["resnet-like"][1], start=r.threshold)
    assert r2.evaluations <= 2
    torch.testing.assert_close(warm.float(), cold, rtol=0, atol=1e-6)


def test_errors():
    s, c = torch.rand(4), torch.ones(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="metric"):
        project_weighted(s, c, 1.0, metric="l1")
    with pytest.raises(ValueError, match="positive and finite"):
        project_weighted(s, torch.tensor([1.0, 0.0, 1.0, 1.0]), 1.0)
    with pytest.raises(ValueError, match="positive and finite"):
        project_weighted(s, torch.tensor([1.0, math.inf, 1.0, 1.0]), 1.0)
    with pytest.raises(ValueError, match="positive and finite"):
        project_weighted(s, torch.tensor([1.0, math.nan, 1.0, 1.0]), 1.0)
    with pytest.raises(ValueError, match="shaped"):
        project_weighted(s, torch.ones(3), 1.0)
    with pytest.raises(ValueError, match="shaped"):
        project_weighted_(s.clone(), torch.ones(5), 1.0)
    with pytest.raises(ValueError, match="NaN or inf"):
        project_weighted(torch.tensor([0.5, math.nan]), torch.ones(2), 1.0)
    with pytest.raises(ValueError, match="floors ask"):
        project_weighted([s[:2], s[2:]], [c[:2], c[2:]], 1.0, floors=[0.8, 0.8])
    with pytest.raises(ValueError, match="floor must lie"):
        project_weighted([s[:2], s[2:]], [c[:2], c[2:]], 5.0, floors=[3.0, 0.0])
    with pytest.raises(ValueError, match="floors for"):
        project_weighted([s[:2], s[2:]], [c[:2], c[2:]], 5.0, floors=[1.0])
    with pytest.raises(ValueError, match="budget"):
        project_weighted(s, c, 0.0)
    with pytest.raises(ValueError, match="sizes"):
        project_weighted_(s.clone(), c, 1.0, sizes=[2, 3])
    with pytest.raises(ValueError, match="float32/float64"):
        project_weighted_(s.half(), c, 1.0)


@pytest.mark.parametrize("metric", METRICS)
def test_a_threshold_float64_cannot_resolve_stays_below_the_budget(metric):
    """10^4 scores tied at 1e9 with a budget that keeps 1e-3 of each: a float64 threshold near 1e9 moves
    every score by 1.2e-7 at once, 1.2e-4 of the budget, more than the window: the answer is the
    neighbouring threshold below the budget, reported as unresolved."""
    s = torch.full((10_000,), 1e9)
    c = torch.full((10_000,), 2.0, dtype=torch.float64)
    out, r = project_weighted(s, c, 20.0, metric=metric)
    total = float(out.double() @ c)
    assert not r.resolved and 20.0 * (1 - 1e-3) < total < 20.0
