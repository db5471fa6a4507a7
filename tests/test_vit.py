"""vit_tiny: a small Vision Transformer in the runner, its attention input projections pruned by
default, and its layers grouped by role in results.json, the report and the plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from probmask import ProbMask
from probmask.app.config import load_config
from probmask.app.errors import UserError
from probmask.app.experiment import run_experiment
from probmask.app.methods import build_method
from probmask.app.models import build_model, parameter_roles, prune_include
from probmask.app.vit import ROLES

# a narrow ViT (width 16, 2 blocks) on a few hundred digits: a few seconds
SMALL = ["model.options.dim=16", "model.options.depth=2", "model.options.heads=2", "model.options.mlp=32"]
TINY_VIT = ["model.name=vit_tiny", *SMALL, "data.train_size=768", "data.test_size=200", "train.batch_size=32",
            "train.epochs=3", "finetune.epochs=1", "prune.sparsity=0.9"]
# prunable weights of that model: patch embedding 16x1x7x7, per block in_proj 48x16, out_proj 16x16,
# MLP 32x16 and 16x32; head 10x16
SMALL_TOTAL = 784 + 2 * (768 + 256 + 512 + 512) + 160


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def tiny_run(one_thread, tmp_path_factory):
    cfg = load_config(None, TINY_VIT)
    return cfg, run_experiment(cfg, tmp_path_factory.mktemp("vit") / "run")


def test_default_model_shape_and_size():
    torch.manual_seed(0)
    model = build_model("vit_tiny", 10, (1, 28, 28))
    assert model.num_patches == 16
    assert model.pos_embed.shape == (1, 17, 64)  # 16 patches and the class token
    assert len(model.blocks) == 4
    attn = model.blocks[0].attn
    assert isinstance(attn, nn.MultiheadAttention) and attn.batch_first and attn.num_heads == 4
    assert model.blocks[0].mlp[0].out_features == 128
    x = torch.randn(5, 1, 28, 28)
    out = model(x)
    assert out.shape == (5, 10) and torch.isfinite(out).all()
    # the class token reads every patch: changing one corner patch changes the logits
    y = x.clone()
    y[:, :, :7, :7] += 1.0
    assert not torch.allclose(model(y), out)


def test_three_channels_and_other_patch_sizes():
    model = build_model("vit_tiny", 100, (3, 32, 32), patch=4, dim=32, depth=1, heads=2, mlp=64)
    assert model.num_patches == 64
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


@pytest.mark.parametrize(("shape", "options", "message"), [
    ((1, 28, 28), {"patch": 5}, "patch 5 must divide"),
    ((1, 28, 28), {"dim": 30, "heads": 4}, "multiple of heads"),
    ((1, 28, 28), {"depth": 0}, "depth must be a positive integer"),
    ((1, 28, 28), {"dropout": 1.0}, "dropout must lie in"),
    ((784,), {}, "needs images"),
    ((1, 28, 28), {"width": 8}, "has no option width"),
])
def test_bad_shapes_and_options_are_user_errors(shape, options, message):
    with pytest.raises(UserError, match=message):
        build_model("vit_tiny", 10, shape, **options)


def test_roles_of_every_prunable_weight():
    model = build_model("vit_tiny", 10, (1, 28, 28), depth=2)
    names = [n for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
    roles = parameter_roles(model, names)
    assert roles == {
        "patch_embed.weight": "patch embedding",
        "blocks.0.attn.in_proj_weight": "attention in (q, k, v)", "blocks.0.attn.out_proj.weight": "attention out",
        "blocks.0.mlp.0.weight": "MLP", "blocks.0.mlp.3.weight": "MLP",
        "blocks.1.attn.in_proj_weight": "attention in (q, k, v)", "blocks.1.attn.out_proj.weight": "attention out",
        "blocks.1.mlp.0.weight": "MLP", "blocks.1.mlp.3.weight": "MLP",
        "head.weight": "head",
    }
    assert set(roles.values()) == set(ROLES)
    assert parameter_roles(model, ["blocks.0.norm1.weight"]) == {"blocks.0.norm1.weight": "other"}
    # a model without roles has none: its layers are reported one by one as before
    assert parameter_roles(build_model("lenet300", 10, (1, 28, 28)), ["1.weight"]) == {}


def test_the_runner_prunes_the_attention_input_projections():
    model = build_model("vit_tiny", 10, (1, 28, 28), dim=16, depth=2, heads=2, mlp=32)
    assert prune_include(model) == ["*.in_proj_weight"]
    cfg = load_config(None, TINY_VIT)
    method = build_method(model, cfg.prune)
    names = [t.name for t in method.targets]
    assert "blocks.0.attn.in_proj_weight" in names and "blocks.1.attn.in_proj_weight" in names
    assert "patch_embed.weight" in names and "head.weight" in names
    assert method.total == SMALL_TOTAL
    # prune.exclude keeps them dense; prune.include replaces the model's patterns
    model = build_model("vit_tiny", 10, (1, 28, 28), dim=16, depth=2, heads=2, mlp=32)
    excluded = load_config(None, [*TINY_VIT, "prune.exclude=['*.in_proj_weight']"]).prune
    assert not any("in_proj" in t.name for t in build_method(model, excluded).targets)
    model = build_model("vit_tiny", 10, (1, 28, 28), dim=16, depth=2, heads=2, mlp=32)
    only = load_config(None, [*TINY_VIT, "prune.include=[blocks.0.attn.in_proj_weight]"]).prune
    names = [t.name for t in build_method(model, only).targets]
    assert "blocks.0.attn.in_proj_weight" in names and "blocks.1.attn.in_proj_weight" not in names


def test_probmask_masks_in_proj_weight_in_the_forward_pass():
    torch.manual_seed(0)
    model = build_model("vit_tiny", 10, (1, 28, 28), dim=16, depth=1, heads=2, mlp=32)
    pm = ProbMask(model, 0.9, include=prune_include(model))
    x = torch.randn(4, 1, 28, 28)
    model.train()
    model(x).sum().backward()
    grads = dict(zip([t.name for t in pm.targets], pm.layout.views(pm.scores.grad)))
    assert grads["blocks.0.attn.in_proj_weight"].abs().sum() > 0  # its scores get gradients
    pm.fix_mask("topk")
    model.eval()
    before = model(x)
    plain = pm.finalize()
    weight = plain.blocks[0].attn.in_proj_weight
    assert 0 < int(torch.count_nonzero(weight)) < weight.numel()  # zeros baked into the attention weights
    assert torch.allclose(plain(x), before, atol=1e-5)


def test_a_tiny_run_keeps_the_exact_budget_and_masks_in_proj(tiny_run):
    cfg, result = tiny_run
    results = json.loads((result.run_dir / "results.json").read_text())
    saved = torch.load(result.run_dir / "model.pt", weights_only=True)
    state, masks = saved["state_dict"], saved["masks"]
    target = 504  # floor(0.1 * 5040)
    assert results["total"] == SMALL_TOTAL and results["target_kept"] == target
    assert sum(int(m.sum()) for m in masks.values()) == target  # the fixed mask keeps exactly k
    for name in ("blocks.0.attn.in_proj_weight", "blocks.1.attn.in_proj_weight"):
        mask, weight = masks[name], state[name]
        assert 0 < int(mask.sum()) < mask.numel()
        assert not torch.any(weight[~mask])  # pruned attention weights are exact zeros
    history = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["phase"] for h in history] == ["main"] * 3 + ["finetune"]
    # it trains: under the fixed mask the training loss is below chance's log(10) = 2.30
    assert history[-1]["train_loss"] < math.log(10) - 0.05


def test_results_report_and_plot_group_layers_by_role(tiny_run):
    cfg, result = tiny_run
    results = json.loads((result.run_dir / "results.json").read_text())
    assert all(layer["role"] in ROLES for layer in results["layers"])
    assert [g["role"] for g in results["roles"]] == list(ROLES)
    for group in results["roles"]:
        members = [layer for layer in results["layers"] if layer["role"] == group["role"]]
        assert group["layers"] == [layer["name"] for layer in members]
        assert group["numel"] == sum(layer["numel"] for layer in members)
        assert group["kept"] == sum(layer["kept"] for layer in members)
    assert [len(g["layers"]) for g in results["roles"]] == [1, 2, 2, 4, 1]
    assert sum(g["kept"] for g in results["roles"]) == results["kept"]
    text = result.report.format()
    assert "attention in (q, k, v) (2 layers)" in text and "MLP total" in text
    assert text.index("blocks.1.attn.in_proj_weight") < text.index("blocks.0.attn.out_proj.weight")  # grouped
    png = (result.run_dir / "layer_density.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_models_without_roles_report_as_before(one_thread, tmp_path):
    from runner_util import TINY

    cfg = load_config(None, [*TINY, "train.epochs=1", "finetune.epochs=0"])
    result = run_experiment(cfg, tmp_path / "run")
    assert "roles" not in result.results
    assert all("role" not in layer for layer in result.results["layers"])
    assert " total" not in result.report.format().replace("\ntotal", "")


def _vit_benchmark():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "vit.py"
    spec = importlib.util.spec_from_file_location("vit_benchmark", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_chooses_settings_by_training_loss_and_pairs_seeds(tmp_path, monkeypatch):
    """benchmarks/vit.py's summary on made-up finished runs: the setting with the lower final
    training loss is chosen (not the one with the higher test accuracy), differences are paired by
    seed, and the RESULTS.md section is replaced in place."""
    bench = _vit_benchmark()
    jobs = bench._jobs([], tmp_path)
    assert len(jobs) == 3 * (2 * 2 + 2 * 2 + 1)
    outcomes = []
    for job in jobs:
        worse = job["setting"] in ("score_lr=0.01", "lr=0.05")  # higher loss, but higher test accuracy
        acc = {"probmask": 93.0, "gmp": 92.0, "dense": 94.0}[job["method"]] + job["seed"] + (5.0 if worse else 0.0)
        run = Path(job["run_dir"])
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text(json.dumps({"train_loss": 0.2 if worse else 0.1}) + "\n")
        outcomes.append({"results": {"test_accuracy": acc, "train_time_s": 1.0}})
    table, numbers = bench.summarize(jobs, outcomes)
    assert "| 90% | 94.00 ± 1.00 (score_lr=0.03) | 93.00 ± 1.00 (lr=0.1) | 95.00 ± 1.00 |" in table
    assert numbers["0.9"]["diff"] == pytest.approx(1.0) and numbers["0.9"]["diff_sd"] == pytest.approx(0.0)
    assert "95%: ProbMask − GMP = +1.00, larger seed spread 1.00: does NOT beat" in bench.verdict(numbers)
    # a missing seed leaves a setting out of the choice; with none complete there is no row to show
    kept = [i for i, job in enumerate(jobs) if not (job["method"] == "gmp" and job["seed"] == 0
                                                    and job["setting"] == "lr=0.1")]
    table, _ = bench.summarize([jobs[i] for i in kept], [outcomes[i] for i in kept])
    assert "(lr=0.05)" in table and "| gmp | lr=0.1 (seeds 1, 2 only) | 90% |" in table
    missing = [i for i in kept if not (jobs[i]["method"] == "gmp" and jobs[i]["seed"] == 0)]
    with pytest.raises(ValueError, match="no setting finished for every seed"):
        bench.summarize([jobs[i] for i in missing], [outcomes[i] for i in missing])

    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\n## Other\ntext\n")
    monkeypatch.setattr(bench, "RESULTS_MD", results)
    bench.write_results("first\n")
    bench.write_results("second\n")
    text = results.read_text()
    assert text.count(bench.BEGIN) == 1 and "second" in text and "first" not in text
    assert text.startswith("# Results\n\n## Other\ntext\n")
