"""The projection against a brute-force sort-based reference, and its floors against KKT."""


import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from probmask import kernels, projection
from probmask.projection import project, project_

WAYS = {  # name: (fused, search)
    "kernels": (True, "host"),
    "pytorch": (False, "host"),
    "device-path": (False, "device"),
    "device-path-operator": (True, "device"),
}


@pytest.fixture(autouse=True, scope="module", params=list(WAYS))
def way(request):
    """Every test four ways: the host search (a check after every Newton step) evaluating with the
    compiled kernels or with PyTorch operations, and the accelerator's search (blocks of Newton
    steps in tensors, no host synchronisation inside a block) with PyTorch operations or with the
    ``probmask::clamp_sums`` operator, all run on the CPU."""
    fused, search = WAYS[request.param]
    if fused and not kernels.available("cpu"):
        pytest.skip("the compiled kernels are not built")
    with kernels.use(fused=fused, search=search):
        yield request.param


def reference_projection(s: np.ndarray, k: float) -> np.ndarray:
    """Euclidean projection onto {0<=x<=1, sum x<=k} by sorting all breakpoints (float64)."""
    s = np.asarray(s, dtype=np.float64)

    def f(v):
        return np.clip(s - v, 0.0, 1.0).sum()

    if f(0.0) <= k:
        return np.clip(s, 0.0, 1.0)
    points = np.unique(np.concatenate([s, s - 1.0, [0.0]]))
    points = points[points >= 0.0]
    values = np.array([f(p) for p in points])  # non-increasing in p
    j = int(np.argmax(values <= k))  # first breakpoint at or below the budget
    lo, hi, flo, fhi = points[j - 1], points[j], values[j - 1], values[j]
    v = lo + (flo - k) * (hi - lo) / (flo - fhi)  # f is linear between two breakpoints
    return np.clip(s - v, 0.0, 1.0)


score_values = st.one_of(
    st.floats(-0.25, 1.25, width=32),
    st.sampled_from([0.0, 0.25, 0.5, 1.0]),  # many ties
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(score_values, min_size=1, max_size=200),
    st.floats(0.01, 1.3),
)
def test_matches_sort_reference(values, budget_fraction):
    scores = torch.tensor(values, dtype=torch.float32)
    k = max(budget_fraction * len(values), 1e-3)
    out, _ = project(scores, k)
    expected = reference_projection(scores.numpy(), k)
    assert float(out.double().sum()) <= k * (1 + 1e-6)
    np.testing.assert_allclose(out.numpy(), expected, atol=2e-6, rtol=0)


@pytest.mark.parametrize("value", [0.0, 0.3, 1.0, 1.1])
def test_all_scores_equal(value):
    scores = torch.full((1000,), value)
    out, _ = project(scores, 250.0)
    expected = reference_projection(scores.numpy(), 250.0)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)
    if value >= 0.25:
        assert float(out.sum()) == pytest.approx(250.0, rel=1e-6)


def test_budget_above_n_only_clamps():
    scores = torch.tensor([-0.5, 0.2, 0.7, 1.5])
    out, result = project(scores, 10.0)
    assert out.tolist() == pytest.approx([0.0, 0.2, 0.7, 1.0])
    assert result.threshold == 0.0


def test_single_element_layers_and_list_input():
    layers = [torch.tensor([0.9]), torch.rand(3, 4), torch.tensor([[0.1]])]
    out, _ = project(layers, 2.0)
    assert [o.shape for o in out] == [t.shape for t in layers]
    flat = torch.cat([o.reshape(-1) for o in out])
    expected = reference_projection(torch.cat([t.reshape(-1) for t in layers]).numpy(), 2.0)
    np.testing.assert_allclose(flat.numpy(), expected, atol=1e-6)


def test_exact_not_tolerance_on_large_input():
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(200_000, generator=gen)
    scores[:50_000] = 1.0
    k = 0.01 * scores.numel()
    out, _ = project(scores, k)
    total = float(out.double().sum())
    assert total <= k * (1 + 1e-6)
    assert total >= k * (1 - 1e-5)  # the budget is used, not undershot by a bisection tolerance


def test_warm_start_gives_same_answer():
    gen = torch.Generator().manual_seed(1)
    scores = torch.rand(10_000, generator=gen)
    cold = scores.clone()
    r = project_(cold, 500.0)
    for start in (0.0, r.threshold * 0.5, r.threshold, r.threshold + 0.2, 3.0):
        warm = scores.clone()
        project_(warm, 500.0, start=start)
        torch.testing.assert_close(warm, cold, atol=1e-6, rtol=0)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.lists(score_values, min_size=1, max_size=40), min_size=1, max_size=5),
    st.floats(0.05, 0.9),
    st.data(),
)
def test_floors_satisfy_kkt(layers, budget_fraction, data):
    sizes = [len(layer) for layer in layers]
    n = sum(sizes)
    k = max(budget_fraction * n, 0.5)
    floors = [data.draw(st.floats(0.0, min(size, k / len(sizes)))) for size in sizes]
    scores = torch.tensor([x for layer in layers for x in layer], dtype=torch.float32)
    original = scores.double().numpy().copy()
    result = project_(scores, k, sizes=sizes, floors=floors)
    x = scores.double().numpy()
    tol = 2e-5
    assert x.min() >= 0 and x.max() <= 1
    assert x.sum() <= k * (1 + 1e-6)
    v = result.threshold
    assert v >= 0
    start = 0
    for i, size in enumerate(sizes):
        part, orig = x[start : start + size], original[start : start + size]
        c = float(result.layer_thresholds[i])
        # every layer is clamp(s - c_l, 0, 1) with its own threshold
        np.testing.assert_allclose(part, np.clip(orig - c, 0, 1), atol=tol)
        assert part.sum() >= floors[i] - tol * max(1, size)
        if result.floor_binding[i]:
            assert c <= v + tol  # the floor only ever raises a layer above the global shift
            assert part.sum() == pytest.approx(floors[i], abs=tol * size + 1e-4)
        else:
            assert c == pytest.approx(v)
        start += size
    if v > tol:  # a positive shift means the budget is tight
        assert x.sum() == pytest.approx(k, rel=1e-5, abs=1e-4)


def test_floor_prevents_layer_collapse():
    # layer 0 has tiny scores: under the global budget alone it would lose every weight
    scores = torch.cat([torch.full((100,), 0.01), torch.full((100,), 0.9)])
    free = scores.clone()
    project_(free, 20.0, sizes=[100, 100])
    assert float(free[:100].sum()) == 0.0
    held = scores.clone()
    result = project_(held, 20.0, sizes=[100, 100], floors=[5, 0])
    assert float(held[:100].sum()) == pytest.approx(5.0, abs=1e-4)
    assert float(held.sum()) <= 20.0 * (1 + 1e-6)
    assert result.floor_binding.tolist() == [True, False]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"budget": 0.0}, "budget must be a positive"),
        ({"budget": float("nan")}, "budget must be a positive"),
        ({"budget": 3.0, "floors": [4.0]}, "floors ask for"),
        ({"budget": 3.0, "sizes": [5, 5]}, "do not split"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        project_(torch.rand(8), **kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_scores_raise(bad):
    scores = torch.rand(100)
    scores[7] = bad
    with pytest.raises(ValueError, match="NaN or inf in the scores"):
        project_(scores, 10.0)


def _erratic(c: float) -> float:
    """-1, 0 or 1, changing erratically from one float32 threshold to the next."""
    bits = int(np.array(c, dtype=np.float32).view(np.int32))
    return float((((bits * 2654435761) & 0xFFFFFFFF) >> 7) % 3 - 1)


def test_converges_when_the_sums_jitter(monkeypatch):
    """Rounding can make f(c) non-monotone at the float32 scale of c (a kernel that summed in
    float32 did: the floor search of a layer then cycled between its bracket's two ends until
    the iteration limit). Sums jittered by a few hundred float32 ulps must still converge, to
    the projection of the exact sums up to the jitter."""
    gen = torch.Generator().manual_seed(3)
    sizes = [5000, 3000, 1000]
    scores = torch.cat([torch.rand(5000, generator=gen), torch.rand(3000, generator=gen) * 1e-3,
                        torch.rand(1000, generator=gen) * 6e-3])
    floors = [10.0, 1.5, 3.0]
    exact = scores.clone()
    project_(exact, 300.0, sizes=sizes, floors=floors)
    amplitude = 2e-5
    sums, sums_all = projection._Plan.sums, projection._Plan.sums_all

    def jittered_sums(self, thresholds, subset, check):
        rows = sums(self, thresholds, subset, check).clone()
        cs = thresholds.tolist() if isinstance(thresholds, torch.Tensor) else list(thresholds)
        for j, pos in enumerate(subset[1]):
            rows[j, -2] += amplitude * _erratic(cs[0] if len(cs) == 1 else cs[pos])
        return rows

    def jittered_sums_all(self, c, check):
        f, n, raw = sums_all(self, c, check)
        return [x + amplitude * _erratic(c) for x in f], n, raw

    monkeypatch.setattr(projection._Plan, "sums", jittered_sums)
    monkeypatch.setattr(projection._Plan, "sums_all", jittered_sums_all)
    out = scores.clone()
    result = project_(out, 300.0, sizes=sizes, floors=floors)
    assert result.floor_binding.tolist() == [False, True, True]
    torch.testing.assert_close(out, exact, rtol=0, atol=1e-6)
