"""bf16 autocast and torch.compile of a ProbMask-wrapped model on the CPU."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from probmask import ProbMask, kernels


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def _compiler_missing() -> str | None:
    """Why torch.compile (Inductor, which builds C++ on the CPU) cannot run here, or None."""
    if not any(shutil.which(cc) for cc in ("gcc", "cc", "clang", "g++", "c++")):
        return "no C/C++ compiler on PATH (Inductor compiles C++ kernels for the CPU)"
    return None


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def test_bf16_autocast_keeps_scores_and_projection_in_float32():
    model = _model()
    pm = ProbMask(model, 0.7)
    pm.set_epoch(5, 10)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = nn.functional.cross_entropy(out.float(), y)
    assert out.dtype == torch.bfloat16  # the layers ran in bf16
    loss.backward()
    assert pm.scores.dtype == pm.scores.grad.dtype == torch.float32
    assert bool(pm.scores.grad.abs().sum() > 0)
    assert all(p.dtype == p.grad.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        pm.scores.sub_(1e-3 * pm.scores.grad)
    pm.project()
    assert pm.scores.dtype == torch.float32
    assert float(pm.scores.detach().sum()) <= pm.budget * (1 + 1e-6)
    pm.fix_mask("topk")
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fixed = model(x)
    with torch.no_grad():
        reference = model(x)
    assert fixed.dtype == torch.bfloat16
    torch.testing.assert_close(fixed.float(), reference, atol=0.1, rtol=0.05)  # bf16 rounding only


def test_compiled_model_matches_eager_with_a_fixed_mask():
    reason = _compiler_missing()
    if reason:
        pytest.skip(f"torch.compile cannot run here: {reason}")
    model = _model()
    pm = ProbMask(model, 0.7)
    pm.fix_mask("topk")
    model.eval()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model)(x)
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-5)
    masks = pm.masks()
    assert not torch.any(model[0].weight[~masks["0.weight"]])  # the mask is applied in the compiled run too


@pytest.mark.skipif(not kernels.available("cpu"), reason="the compiled CPU kernels are not built")
def test_compiled_relaxed_training_step_is_one_graph_and_matches_eager():
    """The relaxed masks are the fused operator, so ``torch.compile(fullgraph=True)`` traces the
    whole training forward (mask sampling included) and its backward. With Inductor's eager-
    compatible random numbers, the same seed gives the same noise key, outputs and gradients."""
    reason = _compiler_missing()
    if reason:
        pytest.skip(f"torch.compile cannot run here: {reason}")
    model = _model()
    pm = ProbMask(model, 0.7)
    pm.set_epoch(3, 10)
    with torch.no_grad():  # interior keep-probabilities: every mask depends on the noise
        pm.scores.uniform_(0.2, 0.9)
    x = torch.randn(5, 1, 8, 8)
    explained = torch._dynamo.explain(model)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    grads, outs = [], []
    with torch._inductor.config.patch(fallback_random=True):
        for net in (compiled, model):
            torch.manual_seed(1)
            out = net(x)
            out.square().sum().backward()
            outs.append(out.detach())
            grads.append([pm.scores.grad.clone(), *(p.grad.clone() for p in model.parameters())])
            pm.scores.grad = None
            model.zero_grad(set_to_none=True)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert bool(grads[0][0].abs().sum() > 0)


def test_runner_with_compile_matches_the_eager_run(tmp_path):
    reason = _compiler_missing()
    if reason:
        pytest.skip(f"torch.compile cannot run here: {reason}")
    import json

    from probmask.app.config import load_config
    from probmask.app.experiment import run_experiment
    from runner_util import TINY

    torch._dynamo.reset()
    runs = {}
    for flag in ("false", "true"):
        cfg = load_config(None, [*TINY, f"compile={flag}", "train.epochs=1", "finetune.epochs=0",
                                 "data.train_size=256", "data.test_size=64"])
        with torch._inductor.config.patch(fallback_random=True):  # the eager run's noise keys
            runs[flag] = run_experiment(cfg, tmp_path / flag)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the compiled forward ran
    eager, compiled = ([json.loads(line) for line in (tmp_path / f / "metrics.jsonl").read_text().splitlines()]
                       for f in ("false", "true"))
    assert [h["phase"] for h in compiled] == ["main"]
    for a, b in zip(eager, compiled):  # same noise and data; float rounding in compiled kernels only
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
        assert b["train_acc"] == pytest.approx(a["train_acc"], abs=0.5)
    assert runs["true"].results["kept"] <= runs["true"].results["target_kept"]
