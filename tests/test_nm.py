"""N:M sparsity: the spec, the per-group projection against a float64 reference, top-N, the
semi-structured pattern check, and ProbMask(granularity=NM(2, 4)) trained, fixed and finalized."""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import probmask
from probmask import ELEMENT, NM, OUTPUT_CHANNEL, ProbMask, kernels
from probmask.nm import (
    SEMI_STRUCTURED_SHAPES,
    check_semi_structured,
    follows_nm,
    parse_nm,
    project_groups_,
    sample_nm_mask,
    semi_structured_problems,
    topn_mask,
)


def reference_projection(groups: torch.Tensor, budget: float) -> torch.Tensor:
    """Each row projected onto {0 <= x <= 1, sum x <= budget}, in float64 by bisection on the
    threshold (100 halvings: to the last bit), independent of the library's breakpoint search."""
    s = groups.double()
    clamped = s.clamp(0, 1)
    over = clamped.sum(1) > budget
    lo = torch.zeros(len(s), dtype=torch.float64)
    hi = s.max(1).values.clamp_min(0)
    for _ in range(100):
        mid = (lo + hi) / 2
        big = (s - mid[:, None]).clamp(0, 1).sum(1) > budget
        lo, hi = torch.where(big, mid, lo), torch.where(big, hi, mid)
    v = torch.where(over, (lo + hi) / 2, torch.zeros_like(lo))
    return (s - v[:, None]).clamp(0, 1)


# ---------------------------------------------------------------------------------------------- spec
def test_parse_nm_accepts_strings_pairs_and_nm():
    assert parse_nm("2:4") == NM(2, 4) == parse_nm((2, 4)) == parse_nm([2, 4]) == parse_nm(NM(2, 4))
    assert parse_nm(" 1 : 2 ") == NM(1, 2)
    assert NM(2, 4).name == "2:4" and NM(2, 4).sparsity == 0.5


@pytest.mark.parametrize("spec", ["4:2", "2:2", "0:4", "a:b", "2", "2:4:8", (2,), (2.0, 4), (True, 4), 24, None])
def test_parse_nm_refuses_bad_specs(spec):
    with pytest.raises(ValueError, match="N:M|N:M spec"):
        parse_nm(spec)


# ---------------------------------------------------------------------------------------------- projection
@settings(max_examples=150, deadline=None)
@given(
    m=st.sampled_from([2, 3, 4, 8, 16]),
    rows=st.integers(1, 40),
    budget_frac=st.floats(0.01, 1.0),
    scale=st.sampled_from([0.1, 1.0, 3.0]),
    seed=st.integers(0, 2**31 - 1),
    ties=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_group_projection_matches_a_float64_reference(m, rows, budget_frac, scale, seed, ties, dtype):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, m, generator=gen, dtype=torch.float64) * scale + 0.5
    if ties:  # heavy ties: values on a coarse grid
        s = (s * 4).round() / 4
    budget = max(budget_frac * m, 1e-3)
    x = s.to(dtype).reshape(-1).clone()
    out = project_groups_(x, budget, m)
    assert out is x
    want = reference_projection(s.to(dtype), budget)
    tol = 1e-9 if dtype == torch.float64 else 4e-6 * max(1.0, float(s.abs().max()))
    torch.testing.assert_close(x.view(rows, m).double(), want, atol=tol, rtol=0)
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    assert float(x.view(rows, m).double().sum(1).max()) <= budget * (1 + 1e-6) + tol


def test_group_projection_leaves_feasible_groups_clamped_and_meets_binding_budgets():
    s = torch.tensor([[0.2, 0.3, 0.1, 0.4], [1.5, -0.5, 0.5, 0.5], [0.9, 0.9, 0.9, 0.9], [1.0, 1.0, 1.0, 1.0]])
    x = project_groups_(s.clone().view(-1), 2.0, 4).view(4, 4)
    torch.testing.assert_close(x[0], s[0])  # sum 1.0: feasible, unchanged
    torch.testing.assert_close(x[1], torch.tensor([1.0, 0.0, 0.5, 0.5]))  # clamped sum is exactly 2
    torch.testing.assert_close(x[2], torch.full((4,), 0.5))
    torch.testing.assert_close(x[3], torch.full((4,), 0.5))


def test_group_projection_chunks_give_the_same_answer(monkeypatch):
    s = torch.rand(1000, 4) * 1.5 - 0.2
    whole = project_groups_(s.clone().view(-1), 2.0, 4)
    monkeypatch.setitem(probmask.nm._CHUNK_GROUPS, "cpu", 3)  # 3 groups per chunk
    chunked = project_groups_(s.clone().view(-1), 2.0, 4)
    torch.testing.assert_close(chunked, whole, atol=0, rtol=0)


def test_group_projection_errors():
    with pytest.raises(ValueError, match="groups of 4"):
        project_groups_(torch.rand(6), 2.0, 4)
    with pytest.raises(ValueError, match="NaN or inf"):
        project_groups_(torch.tensor([0.5, float("nan"), 0.2, 0.1]), 2.0, 4)
    with pytest.raises(ValueError, match="positive"):
        project_groups_(torch.rand(8), 0.0, 4)
    with pytest.raises(ValueError, match="contiguous"):
        project_groups_(torch.rand(4, 8).t(), 2.0, 4)


# ---------------------------------------------------------------------------------------------- top-N
@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 2), (3, 8), (1, 4)])
def test_topn_keeps_exactly_n_of_the_highest_with_ties_to_the_lower_index(n, m):
    gen = torch.Generator().manual_seed(n * 10 + m)
    scores = torch.randint(0, 3, (300 * m,), generator=gen).float()  # many ties
    mask = topn_mask(scores, n, m)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert (mask.view(-1, m).sum(1) == n).all()
    for group, kept in zip(scores.view(-1, m).tolist(), mask.view(-1, m).tolist()):
        want = sorted(range(m), key=lambda i: (-group[i], i))[:n]
        assert [i for i in range(m) if kept[i]] == sorted(want)


def test_sampled_masks_are_repaired_to_exactly_n_per_group():
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0])  # 3, 1, 2 certain draws
    for seed in range(5):
        mask = sample_nm_mask(scores, 2, 4, torch.Generator().manual_seed(seed)).view(3, 4)
        assert (mask.sum(1) == 2).all()
        assert mask[1, 3] and mask[2, 1] and mask[2, 3]  # drawn weights stay while a group has room
    probs = torch.rand(4000)
    mask = sample_nm_mask(probs, 2, 4, torch.Generator().manual_seed(0))
    assert (mask.view(-1, 4).sum(1) == 2).all()


# ---------------------------------------------------------------------------------------------- pattern check
def two_of_four(rows, cols, dtype=torch.float16):
    w = torch.randn(rows, cols).to(dtype)
    return w * topn_mask(torch.rand(rows * cols), 2, 4).view(rows, cols).to(dtype)


def test_semi_structured_check_accepts_2_of_4_and_names_every_problem():
    check_semi_structured(two_of_four(64, 128))
    check_semi_structured(two_of_four(32, 64, torch.bfloat16), backend="cutlass")
    check_semi_structured(two_of_four(32, 32, torch.int8))
    assert follows_nm(two_of_four(16, 16), 2, 4) and not follows_nm(torch.ones(16, 16), 2, 4)
    bad = two_of_four(64, 128)
    bad[3, 4:8] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    with pytest.raises(ValueError, match="more than 2 non-zeros"):
        check_semi_structured(bad)
    problems = semi_structured_problems(two_of_four(64, 128, torch.float32))
    assert len(problems) == 1 and "float32" in problems[0]
    assert "shape (24, 128)" in semi_structured_problems(two_of_four(24, 128))[0]
    assert "3 dimensions" in semi_structured_problems(torch.zeros(16, 16, 4, dtype=torch.float16))[0]
    assert "contiguous" in semi_structured_problems(two_of_four(64, 64).t())[0]
    assert "(30 wide) do not split into groups of 4" in semi_structured_problems(torch.zeros(32, 30))[-1]
    # CUTLASS float32 is 1:2: a 2:4 weight with both non-zeros in one pair is refused
    pairs = torch.tensor([1.0, 1.0, 0.0, 0.0]).repeat(32, 8)
    assert "more than 1 non-zeros" in semi_structured_problems(pairs, backend="cutlass")[0]
    check_semi_structured(torch.tensor([1.0, 0.0, 0.0, 1.0]).repeat(32, 8), backend="cutlass")
    with pytest.raises(ValueError, match="backend"):
        semi_structured_problems(pairs, backend="cusparse")


def test_semi_structured_shapes_agree_with_the_installed_pytorch():
    semi = pytest.importorskip("torch.sparse.semi_structured")
    classes = {"cusparselt": "SparseSemiStructuredTensorCUSPARSELT", "cutlass": "SparseSemiStructuredTensorCUTLASS"}
    for backend, name in classes.items():
        table = getattr(getattr(semi, name, None), "_DTYPE_SHAPE_CONSTRAINTS", None)
        if table is None:
            pytest.skip("this PyTorch keeps its constraints elsewhere")
        theirs = {d: (c.sparse_min_rows, c.sparse_min_cols) for d, c in table.items()}
        assert theirs == SEMI_STRUCTURED_SHAPES[backend]


# ---------------------------------------------------------------------------------------------- ProbMask
def mlp():
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))


def train(pm, model, steps=6, epoch=(3, 4)):
    x, y = torch.randn(64, 32), torch.randint(0, 16, (64,))
    opt_w = torch.optim.SGD(pm.weight_parameters(), lr=0.05, momentum=0.9)
    opt_s = torch.optim.Adam(pm.score_parameters(), lr=0.05)
    pm.set_epoch(*epoch)
    model.train()
    for _ in range(steps):
        opt_w.zero_grad()
        opt_s.zero_grad()
        probmask.accumulate_samples(lambda: nn.functional.cross_entropy(model(x), y), 2)
        opt_w.step()
        opt_s.step()
        pm.project()


@pytest.mark.parametrize("fused", [True, False], ids=["kernels", "no-kernels"])
def test_probmask_nm_trains_fixes_and_finalizes_to_2_of_4(fused):
    torch.manual_seed(0)
    model = mlp()
    with kernels.use(fused=fused):
        pm = ProbMask(model, granularity=NM(2, 4))
    assert pm._fused == (fused and kernels.available("cpu"))
    assert pm.sparsity == 0.5 and pm.target_kept == pm.total // 2 and pm.floors == [0, 0, 0]
    train(pm, model)
    groups = pm.scores.detach().view(-1, 4)
    assert float(groups.sum(1).max()) <= 2 * (1 + 1e-6) and float(groups.min()) >= 0
    assert float(groups.sum(1).min()) < 2  # the budget bit and some groups sit below it
    pm.fix_mask()
    masks = pm.masks()
    small = pm.finalize()
    assert small is model and not any(hasattr(m, "parametrizations") for m in model.modules())
    for name, layer in [("0.weight", model[0]), ("2.weight", model[2]), ("4.weight", model[4])]:
        mask = masks[name]
        assert (mask.view(mask.shape[0], -1, 4).sum(-1) == 2).all()
        assert (layer.weight[~mask] == 0).all()
        assert follows_nm(layer.weight, 2, 4)
        check_semi_structured(layer.weight.detach().half())
    broken = model[0].weight.detach().half().clone()
    broken[0, :4] = 1.0
    with pytest.raises(ValueError, match="more than 2"):
        check_semi_structured(broken)


def test_the_group_budget_follows_the_schedule_from_m_to_n():
    model = mlp()
    pm = ProbMask(model, granularity=NM(2, 4))
    pm.set_epoch(0, 10)  # dense phase: budget M per group, the projection only clamps
    with torch.no_grad():
        pm.scores.uniform_(0.5, 1.2)
    pm.project()
    sums = pm.scores.detach().view(-1, 4).sum(1)
    assert float(pm.scores.detach().max()) == 1.0 and float(sums.max()) > 3
    keep = pm.budget_schedule(3.0, 10)
    pm.set_epoch(3, 10)
    assert 0.5 < keep < 1
    pm.project()
    assert float(pm.scores.detach().view(-1, 4).sum(1).max()) <= 4 * keep * (1 + 1e-6)
    assert pm.stats()["budget"] == pytest.approx(keep)
    pm.set_epoch(9, 10)
    pm.project()
    torch.testing.assert_close(pm.scores.detach().view(-1, 4).sum(1).max(), torch.tensor(2.0))


def test_fix_by_sampling_gives_exactly_n_per_group():
    torch.manual_seed(1)
    model = mlp()
    pm = ProbMask(model, granularity=NM(1, 4), fix="sample", fix_samples=3)
    train(pm, model, steps=3)
    calls = []
    mask = pm.fix_mask(score_fn=lambda: calls.append(1) or float(len(calls)))
    assert len(calls) == 3 and (mask.view(-1, 4).sum(1) == 1).all()
    assert int(mask.sum()) == pm.target_kept == pm.total // 4


def test_convolutions_group_along_in_channels_times_kernel():
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 16))
    pm = ProbMask(model, granularity=NM(2, 4))
    train_x = torch.randn(4, 4, 8, 8)
    pm.set_epoch(3, 4)
    model.train()
    model(train_x).sum().backward()
    pm.project()
    pm.fix_mask()
    model = pm.finalize()
    assert follows_nm(model[0].weight.flatten(1), 2, 4) and follows_nm(model[3].weight, 2, 4)
    assert int((model[0].weight != 0).sum()) <= model[0].weight.numel() // 2


def test_layers_of_the_wrong_width_are_named_with_exclude():
    model = nn.Sequential(nn.Linear(30, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"0\.weight.*30.*exclude="):
        ProbMask(model, granularity=NM(2, 4))
    pm = ProbMask(model, granularity=NM(2, 4), exclude="0.weight")
    assert pm.layout.names == ("2.weight",)
    with pytest.raises(ValueError, match=r"0\.weight.*27"):
        ProbMask(nn.Sequential(nn.Conv2d(3, 8, 3)), granularity=NM(2, 4))
    with pytest.raises(ValueError, match=r"transposed convolution.*0\.weight"):
        ProbMask(nn.Sequential(nn.ConvTranspose2d(4, 8, 3)), granularity=NM(2, 4))


def test_nm_refuses_floors_other_sparsities_and_other_granularities():
    with pytest.raises(ValueError, match="floors do not apply"):
        ProbMask(mlp(), granularity=NM(2, 4), floor="unit")
    with pytest.raises(ValueError, match="floors do not apply"):
        ProbMask(mlp(), granularity=NM(2, 4), floor=3)
    assert ProbMask(mlp(), granularity=NM(2, 4), floor=None).floors == [0, 0, 0]
    with pytest.raises(ValueError, match="removes exactly 0.5.*sparsity=None"):
        ProbMask(mlp(), 0.9, granularity=NM(2, 4))
    assert ProbMask(mlp(), 0.5, granularity=NM(2, 4)).sparsity == 0.5
    with pytest.raises(ValueError, match="sparsity is required"):
        ProbMask(mlp())
    with pytest.raises(ValueError, match="granularity ELEMENT or NM"):
        ProbMask(mlp(), 0.5, granularity=OUTPUT_CHANNEL)
    assert ProbMask(mlp(), 0.5, granularity=ELEMENT).layout.granularity == ELEMENT


def test_state_round_trip_and_a_state_of_another_granularity_is_refused():
    torch.manual_seed(2)
    model = mlp()
    pm = ProbMask(model, granularity=NM(2, 4))
    train(pm, model, steps=2)
    state = pm.state_dict()
    assert state["granularity"] == "2:4"
    other = ProbMask(mlp(), granularity=NM(2, 4))
    other.load_state_dict(state)
    torch.testing.assert_close(other.scores, pm.scores)
    with pytest.raises(ValueError, match="granularity '2:4'.*'1:2'"):
        ProbMask(mlp(), granularity=NM(1, 2)).load_state_dict(state)
    with pytest.raises(ValueError, match="granularity"):
        ProbMask(mlp(), 0.5).load_state_dict(state)


def test_the_environment_switch_turns_the_kernels_off_and_n_m_still_holds():
    """PROBMASK_KERNELS=0 is read when probmask.kernels is imported: a fresh interpreter."""
    code = (
        "import torch, probmask\n"
        "from torch import nn\n"
        "torch.manual_seed(0)\n"
        "model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))\n"
        "pm = probmask.ProbMask(model, granularity=probmask.NM(2, 4))\n"
        "assert not pm._fused\n"
        "pm.set_epoch(3, 4); model.train()\n"
        "opt = torch.optim.Adam(pm.score_parameters(), lr=0.05)\n"
        "for _ in range(3):\n"
        "    opt.zero_grad(); model(torch.randn(8, 16)).square().mean().backward(); opt.step(); pm.project()\n"
        "pm.fix_mask()\n"
        "assert all((m.view(m.shape[0], -1, 4).sum(-1) == 2).all() for m in pm.masks().values())\n"
        "print('ok')\n"
    )
    env = {**os.environ, kernels.ENV: "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_methods_that_fix_one_global_mask_refuse_nm():
    from probmask.app.baselines import Magnitude, RandomMask

    for method in (Magnitude, RandomMask):
        with pytest.raises(ValueError, match=r"cannot keep a budget per group \(2:4\).*ProbMask\(model, granularity"):
            method(mlp(), 0.5, granularity=NM(2, 4))
