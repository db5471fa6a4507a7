"""The baseline methods through the runner: exact target counts, training, their defining
mask structure (global vs uniform, gradual vs one-shot, frozen weights), errors and resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from probmask.app.baselines import uniform_counts
from probmask.app.config import load_config
from probmask.app.errors import UserError
from probmask.app.experiment import Experiment, run_experiment
from probmask.app.methods import METHODS, build_method
from probmask.app.models import build_model
from runner_util import TINY

# 0.8 rather than TINY's 0.9: a random mask of the narrow tiny net must still connect input to output
BASE = [*TINY, "prune.sparsity=0.8", "train.epochs=4", "finetune.epochs=1"]
TOTAL = 784 * 32 + 32 * 16 + 16 * 10
TARGET = math.floor(0.2 * TOTAL + 1e-6)
BASELINES = ["dense", "edgepopup", "gmp", "gmp_uniform", "oneshot", "random"]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _overrides(method: str) -> list[str]:
    return [*BASE, f"prune.method={method}", *(["prune.freeze_weights=true"] if method == "edgepopup" else [])]


@pytest.fixture(scope="module")
def runs(one_thread, tmp_path_factory):
    """One tiny run per baseline, shared by the tests that only read them."""
    out = {}
    for method in BASELINES:
        run_dir = tmp_path_factory.mktemp(method) / "run"
        result = run_experiment(load_config(None, _overrides(method)), run_dir)
        history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        out[method] = (result, history)
    return out


def test_every_baseline_is_registered():
    assert set(BASELINES) | {"probmask"} <= set(METHODS.names())


@pytest.mark.parametrize("method", BASELINES)
def test_exact_target_count_and_training(runs, method):
    result, history = runs[method]
    r = result.results
    expected = TOTAL if method == "dense" else TARGET
    assert r["kept"] == expected and r["target_kept"] == expected and r["total"] == TOTAL
    assert all(layer["kept"] >= 1 for layer in r["layers"])
    assert r["method"] == method and Path(result.run_dir, "results.json").is_file()
    main = [h["train_loss"] for h in history if h["phase"] == "main"]
    assert main[-1] < main[0] - 0.02, main  # it learns
    assert r["test_accuracy"] > 15  # ten classes: chance is 10%


def test_dense_keeps_everything(runs):
    assert runs["dense"][0].results["sparsity"] == 0.0


def test_uniform_methods_keep_one_rate_in_every_layer(runs):
    counts = uniform_counts([784 * 32, 32 * 16, 16 * 10], TARGET)
    for method in ("gmp_uniform", "random", "edgepopup"):
        kept = [layer["kept"] for layer in runs[method][0].results["layers"]]
        assert kept == counts, method
        for layer in runs[method][0].results["layers"]:
            assert abs(layer["kept"] - 0.2 * layer["numel"]) <= 1


def test_global_magnitude_methods_allocate_per_layer(runs):
    for method in ("gmp", "oneshot"):
        density = [layer["density"] for layer in runs[method][0].results["layers"]]
        assert max(density) - min(density) > 0.05, (method, density)  # not one rate
        assert min(layer["kept"] for layer in runs[method][0].results["layers"]) >= 16  # floor "auto": one per unit


def test_gmp_follows_the_cubic_budget_and_oneshot_cuts_once(runs):
    gmp = [h for h in runs["gmp"][1] if h["phase"] == "main"]
    assert gmp[0]["budget"] == 1.0 and gmp[-1]["budget"] == pytest.approx(0.2)
    densities = [h["density"] for h in gmp]
    assert densities == sorted(densities, reverse=True) and densities[-1] == pytest.approx(TARGET / TOTAL)
    oneshot = runs["oneshot"][1]
    assert [h["density"] for h in oneshot] == [1.0] * 4 + [pytest.approx(TARGET / TOTAL)]


def test_pruned_weights_stay_zero_and_edgepopup_weights_stay_at_init(tmp_path):
    for method in ("gmp", "edgepopup"):
        cfg = load_config(None, [*_overrides(method), "train.epochs=2", "finetune.epochs=1"])
        exp = Experiment(cfg, tmp_path / method)
        init = {n: p.detach().clone() for n, p in exp.model.named_parameters()}
        result = exp.run()
        state = torch.load(tmp_path / method / "model.pt", weights_only=True)
        for name, mask in state["masks"].items():
            weight = state["state_dict"][name]
            assert int(torch.count_nonzero(weight[~mask])) == 0
        if method == "edgepopup":
            for name, value in state["state_dict"].items():
                key = name.replace(".weight", ".parametrizations.weight.original") if name in state["masks"] else name
                expected = init[key] * state["masks"][name] if name in state["masks"] else init[key]
                assert torch.equal(value, expected), name
        assert result.results["kept"] == TARGET


def test_gmp_resume_after_a_kill_equals_the_uninterrupted_run(tmp_path):
    cfg = load_config(None, [*_overrides("gmp"), "train.epochs=3", "finetune.epochs=1"])
    straight = run_experiment(cfg, tmp_path / "straight")

    class Kill(Exception):
        pass

    def kill(record):
        if record["epoch"] == 1:
            raise Kill

    with pytest.raises(Kill):
        run_experiment(cfg, tmp_path / "resumed", on_epoch_end=kill)
    resumed = run_experiment(cfg, tmp_path / "resumed", resume=True)
    assert resumed.results["test_accuracy"] == straight.results["test_accuracy"]
    assert resumed.results["layers"] == straight.results["layers"]


@pytest.mark.parametrize("overrides, message", [
    (["prune.method=edgepopup"], "set prune.freeze_weights=true"),
    (["prune.method=gmp", "prune.freeze_weights=true"], "set prune.freeze_weights=false"),
    (["prune.method=gmp", "prune.sparsity=0.99999"], "keeps none"),
    (["prune.method=gmp_uniform", "prune.sparsity=0.9999", "prune.floor=null"], "at least one in each"),
    (["prune.method=oneshot", "prune.floor=2000"], "floors keep"),
])
def test_bad_settings_are_user_errors(overrides, message):
    cfg = load_config(None, [*TINY, *overrides])
    model = build_model("lenet300", 10, (1, 28, 28), hidden=[32, 16])
    with pytest.raises(UserError, match=message):
        build_method(model, cfg.prune)


def test_mask_interval_is_checked():
    with pytest.raises(UserError, match="prune.mask_interval"):
        load_config(None, ["prune.mask_interval=0"])


@pytest.mark.parametrize("sizes, k", [([10, 10, 10], 7), ([1000, 10, 1], 12), ([5, 5], 10), ([3, 100, 7], 3)])
def test_uniform_counts_add_up_at_one_rate(sizes, k):
    counts = uniform_counts(sizes, k)
    assert sum(counts) == k and all(1 <= c <= n for c, n in zip(counts, sizes))
    if all(k * n >= sum(sizes) for n in sizes):  # every quota at least 1: no layer is lifted to 1
        assert all(abs(c - k * n / sum(sizes)) < 1 + 1e-9 for c, n in zip(counts, sizes))
    with pytest.raises(ValueError):
        uniform_counts(sizes, len(sizes) - 1)
