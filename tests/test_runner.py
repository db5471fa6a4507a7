"""The runner end to end: results against the saved model, metrics, plots, resume after a kill,
supermask mode, mask fixing by sampling, and the CIFAR and ImageNet code paths on generated data."""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from probmask.app.artifacts import load_model
from probmask.app.cli import main
from probmask.app.config import config_to_dict, load_config
from probmask.app.data import load_data
from probmask.app.errors import UserError
from probmask.app.experiment import Experiment, run_experiment
from probmask.app.methods import METHODS
from probmask.app.models import build_model
from probmask.fixing import topk_mask
from probmask.masked import MaskedModel
from probmask.schedules import CubicBudget, TemperatureSchedule
from runner_util import TINY, write_cifar, write_image_folder

TINY_TOTAL = 784 * 32 + 32 * 16 + 16 * 10
STEPS_PER_EPOCH = 768 // 64
ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def tiny(one_thread, tmp_path_factory):
    """One uninterrupted tiny run, shared by the tests that only read it."""
    cfg = load_config(None, TINY)
    result = run_experiment(cfg, tmp_path_factory.mktemp("tiny") / "run")
    return cfg, result


def _numbers(results: dict) -> dict:
    keys = ("test_accuracy", "test_loss", "sparsity", "kept", "total", "layers")
    return {k: results[k] for k in keys}


def _history(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "time_s"} for line in lines]


def _same_model(a: Path, b: Path) -> bool:
    sa = torch.load(a / "model.pt", weights_only=True)["state_dict"]
    sb = torch.load(b / "model.pt", weights_only=True)["state_dict"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_results_are_recounted_from_the_saved_model(tiny):
    cfg, result = tiny
    results = json.loads((result.run_dir / "results.json").read_text())
    assert results == json.loads(json.dumps(result.results))
    saved = torch.load(result.run_dir / "model.pt", weights_only=True)
    state, masks, meta = saved["state_dict"], saved["masks"], saved["meta"]
    assert [layer["name"] for layer in results["layers"]] == list(masks) == ["1.weight", "3.weight", "5.weight"]
    for layer in results["layers"]:
        weight = state[layer["name"]]
        assert layer["numel"] == weight.numel()
        assert layer["kept"] == int(torch.count_nonzero(weight))
        assert not torch.any(weight[~masks[layer["name"]]])  # pruned weights are exact zeros
    assert results["total"] == TINY_TOTAL == sum(layer["numel"] for layer in results["layers"])
    assert results["kept"] == sum(layer["kept"] for layer in results["layers"])
    assert results["sparsity"] == pytest.approx(1 - results["kept"] / results["total"])
    target_kept = math.floor(0.1 * TINY_TOTAL)
    assert results["target_kept"] == target_kept
    assert results["kept"] <= target_kept and results["sparsity"] >= 0.9
    assert results["kept"] >= target_kept - 3  # top-k keeps the budget (a kept weight may be exactly 0)
    assert meta["model"] == "lenet300" and meta["model_options"] == {"hidden": [32, 16]}
    assert meta["input_shape"] == [1, 28, 28] and meta["num_classes"] == 10
    assert meta["config"] == config_to_dict(cfg)

    # the recorded accuracy is the saved model's accuracy on the test set
    model, _, _ = load_model(result.run_dir / "model.pt")
    test = load_data(cfg.data).test
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in DataLoader(test, batch_size=100))
    assert results["test_accuracy"] == pytest.approx(100 * correct / len(test))
    assert results["test_accuracy"] > 30  # a tiny run still learns (chance: 10%)


def test_metrics_follow_the_schedules(tiny):
    cfg, result = tiny
    history = _history(result.run_dir)
    assert [(h["phase"], h["epoch"]) for h in history] == [
        ("main", 0), ("main", 1), ("main", 2), ("main", 3), ("finetune", 0), ("finetune", 1)
    ]
    budget, temperature = CubicBudget(0.1), TemperatureSchedule()
    for h in history[:4]:
        assert h["budget"] == pytest.approx(max(budget(h["epoch"], 4), math.floor(0.1 * TINY_TOTAL) / TINY_TOTAL))
        assert h["temperature"] == pytest.approx(temperature(h["epoch"], 4))
        assert h["density"] <= h["budget"] + 1e-6  # the projection holds the budget
        assert h["score_lr"] is not None and h["lr"] <= cfg.train.lr
        for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
            assert math.isfinite(h[key])
    for h in history[4:]:
        assert h["temperature"] is None and h["score_lr"] is None
        assert h["density"] == pytest.approx(result.results["target_kept"] / TINY_TOTAL)
        assert h["lr"] <= cfg.finetune.lr


def test_run_directory_contents(tiny):
    cfg, result = tiny
    d = result.run_dir
    names = {p.name for p in d.iterdir()}
    assert names == {"config.yaml", "metrics.jsonl", "checkpoint.pt", "results.json", "model.pt",
                     "layer_density.png", "training.png"}  # no temporary files left behind
    assert load_config(d / "config.yaml") == cfg
    for png in ("layer_density.png", "training.png"):
        data = (d / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    ckpt = torch.load(d / "checkpoint.pt", weights_only=True)
    assert (ckpt["phase"], ckpt["epoch"]) == ("finetune", 2)
    assert yaml.safe_load((d / "config.yaml").read_text())["train"]["epochs"] == 4


class _Kill(Exception):
    pass


def _kill_after_steps(exp: Experiment, steps: int) -> None:
    original, count = exp.method.step, [0]

    def step():
        original()
        count[0] += 1
        if count[0] == steps:
            raise _Kill

    exp.method.step = step  # type: ignore[method-assign]


@pytest.mark.parametrize(
    "steps",
    [STEPS_PER_EPOCH + 3, 4 * STEPS_PER_EPOCH + STEPS_PER_EPOCH + 2],
    ids=["mid-main-epoch-2", "mid-finetune-epoch-2"],
)
def test_resume_after_a_kill_mid_epoch_equals_the_uninterrupted_run(tiny, tmp_path, steps):
    cfg, straight = tiny
    run_dir = tmp_path / "run"
    exp = Experiment(cfg, run_dir)
    _kill_after_steps(exp, steps)
    with pytest.raises(_Kill):
        exp.run()
    assert not (run_dir / "results.json").exists()
    resumed = Experiment(cfg, run_dir).run(resume=True)
    assert _numbers(resumed.results) == _numbers(straight.results)
    assert _history(run_dir) == _history(straight.run_dir)
    assert _same_model(run_dir, straight.run_dir)


def test_resume_between_the_phases(tiny, tmp_path):
    """Stopped right after the last main epoch's checkpoint: the resumed run fixes the mask itself."""
    cfg, straight = tiny

    def stop(record):
        if record["phase"] == "main" and record["epoch"] == cfg.train.epochs - 1:
            raise _Kill

    with pytest.raises(_Kill):
        run_experiment(cfg, tmp_path / "run", on_epoch_end=stop)
    resumed = run_experiment(cfg, tmp_path / "run", resume=True)
    assert _numbers(resumed.results) == _numbers(straight.results)
    assert _same_model(tmp_path / "run", straight.run_dir)


def test_resume_after_sigkill_of_the_command(tiny, tmp_path, capsys):
    cfg, straight = tiny
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "probmask", "run", "--out", str(run_dir), "--quiet", *TINY],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 1:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode() if proc.stderr else ""
    proc.stderr.close()
    assert not (run_dir / "results.json").exists()
    (run_dir / ".checkpoint.pt.abc.tmp").write_bytes(b"half")  # as if killed while writing
    assert main(["run", "--resume", str(run_dir), "--quiet"]) == 0
    assert not list(run_dir.glob(".*.tmp"))
    assert "test accuracy" in capsys.readouterr().out
    results = json.loads((run_dir / "results.json").read_text())
    assert _numbers(results) == _numbers(straight.results)
    assert _same_model(run_dir, straight.run_dir)


def test_resuming_a_finished_run_changes_nothing(tiny, tmp_path):
    cfg, straight = tiny
    copy = tmp_path / "copy"
    shutil.copytree(straight.run_dir, copy)
    again = run_experiment(cfg, copy, resume=True)
    assert _numbers(again.results) == _numbers(straight.results)
    assert _history(copy) == _history(straight.run_dir)


def test_resume_refuses_a_checkpoint_of_another_config(tiny, tmp_path):
    cfg, straight = tiny
    copy = tmp_path / "copy"
    shutil.copytree(straight.run_dir, copy)
    other = load_config(None, [*TINY, "train.score_lr=0.05"])
    with pytest.raises(UserError, match=r"was run with a different config \(train.score_lr: 0.03 in the checkpoint"):
        run_experiment(other, copy, resume=True)


def test_unreadable_checkpoint_is_a_user_error(tiny, tmp_path):
    cfg, straight = tiny
    copy = tmp_path / "copy"
    shutil.copytree(straight.run_dir, copy)
    (copy / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="checkpoint.pt is not a checkpoint probmask wrote.*delete it to restart"):
        run_experiment(cfg, copy, resume=True)


def test_supermask_mode_trains_only_the_scores(tmp_path):
    cfg = load_config(None, [*TINY, "prune.freeze_weights=true", "train.epochs=2"])
    torch.manual_seed(cfg.seed)
    initial = build_model("lenet300", 10, (1, 28, 28), hidden=[32, 16]).state_dict()
    result = run_experiment(cfg, tmp_path / "run")
    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    for name, value in saved["state_dict"].items():
        if name in saved["masks"]:
            assert torch.equal(value, initial[name] * saved["masks"][name])  # random weights, masked
        else:
            assert torch.equal(value, initial[name])  # biases untouched too
    assert [h["phase"] for h in _history(tmp_path / "run")] == ["main", "main"]  # no finetuning
    assert result.results["epochs"] == {"main": 2, "finetune": 0}
    assert result.results["kept"] <= result.results["target_kept"]


def test_fix_by_best_of_n_samples(tmp_path, caplog):
    cfg = load_config(None, [*TINY, "prune.fix=sample", "prune.fix_samples=3", "prune.fix_batches=2",
                             "finetune.epochs=0", "train.epochs=2"])
    with caplog.at_level(logging.INFO, logger="probmask"):
        result = run_experiment(cfg, tmp_path / "run")
    assert "best of 3 samples by training accuracy" in caplog.text
    assert sum("fix_mask: sample" in r.getMessage() for r in caplog.records) == 3
    assert 0 < result.results["kept"] <= result.results["target_kept"]


def test_cpu_run_with_bf16_autocast_and_tensorboard_completes(tmp_path, caplog):
    cfg = load_config(None, [*TINY, "bf16=true", "tensorboard=true", "train.epochs=1", "finetune.epochs=1"])
    exp = Experiment(cfg, tmp_path / "run")
    seen = set()
    exp.model.register_forward_hook(lambda module, args, out: seen.add((module.training, out.dtype)))
    scores = exp.method.score_parameters()[0]
    with caplog.at_level(logging.WARNING, logger="probmask"):
        result = exp.run()
    assert seen == {(True, torch.bfloat16), (False, torch.bfloat16)}  # training and evaluation in bf16
    assert scores.dtype == torch.float32  # the scores (and their projection) stay in float32
    assert all(p.dtype == torch.float32 for p in exp.model.parameters())
    assert "bf16" not in caplog.text
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert "the tensorboard package is not installed" in caplog.text
    else:
        assert (tmp_path / "run" / "tensorboard").is_dir()
    assert result.results["kept"] <= result.results["target_kept"]


@pytest.mark.parametrize(
    ("data", "model", "classes"),
    [("cifar10", ["model.name=resnet32", "model.width=4"], 10),
     ("cifar100", ["model.name=vgg19_bn", "model.width=2"], 100)],
)
def test_cifar_code_path(tmp_path, monkeypatch, data, model, classes):
    write_cifar(tmp_path / "data", monkeypatch, classes=classes, per_file=8)
    cfg = load_config(None, [f"data.name={data}", f"data.root={tmp_path / 'data'}", *model,
                             "train.epochs=2", "finetune.epochs=1", "train.batch_size=16", "prune.sparsity=0.9",
                             "prune.fix=sample", "prune.fix_samples=2"])
    result = run_experiment(cfg, tmp_path / "run")
    _, masks, meta = load_model(tmp_path / "run" / "model.pt")
    assert meta["num_classes"] == classes and meta["input_shape"] == [3, 32, 32]
    assert result.results["kept"] <= result.results["target_kept"]
    assert result.results["sparsity"] >= 0.9
    assert len(_history(tmp_path / "run")) == 3


def test_imagenet_code_path_with_a_torchvision_model(tmp_path):
    write_image_folder(tmp_path / "imagenet", classes=3, per_class=4)
    cfg = load_config(None, ["data.name=imagenet", f"data.root={tmp_path / 'imagenet'}", "data.image_size=32",
                             "model.name=torchvision:mobilenet_v3_small", "train.epochs=1", "finetune.epochs=1",
                             "train.batch_size=6", "prune.sparsity=0.9", "train.samples=1"])
    result = run_experiment(cfg, tmp_path / "run")
    model, masks, meta = load_model(tmp_path / "run" / "model.pt")
    assert not model.training
    assert meta["model"] == "torchvision:mobilenet_v3_small" and meta["num_classes"] == 3
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)
    prunable = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert sorted(masks) == sorted(f"{n}.weight" for n in prunable)
    assert result.results["sparsity"] >= 0.9


def test_threads_are_set_for_the_run_and_restored_after(tmp_path):
    seen = []
    torch.set_num_threads(2)
    try:
        cfg = load_config(None, [*TINY, "train.epochs=1", "finetune.epochs=0", "threads=1"])
        run_experiment(cfg, tmp_path / "run", on_epoch_end=lambda record: seen.append(torch.get_num_threads()))
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


class _LargestWeights(MaskedModel):
    """A whole method on the masked-model base: dense training, then the largest weights kept."""

    def _final_mask(self, score_fn, generator):
        weights = [m.parametrizations[t.param_name].original for m, t in zip(self._modules, self.targets)]
        magnitudes = torch.cat([w.detach().abs().flatten() for w in weights])
        return topk_mask(magnitudes, self.target_kept, self.layout.sizes, self.floors)


@METHODS.register("test_largest_weights")
def _largest_weights(model, cfg):
    return _LargestWeights(model, cfg.sparsity, floor=cfg.floor)


def test_another_method_plugs_into_the_runner(tmp_path):
    """The masked-model base is enough for a baseline: it writes only how its mask is chosen."""
    cfg = load_config(None, [*TINY, "prune.method=test_largest_weights", "train.epochs=2", "finetune.epochs=1"])
    result = run_experiment(cfg, tmp_path / "run")
    assert [h["phase"] for h in _history(tmp_path / "run")] == ["main", "main", "finetune"]
    assert result.results["method"] == "test_largest_weights"
    assert result.results["kept"] == result.results["target_kept"] == int(0.1 * result.results["total"] + 1e-6)
    state = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    for name, mask in state["masks"].items():  # pruned weights are zero, finetuning kept them so
        assert int(torch.count_nonzero(state["state_dict"][name][~mask])) == 0
    assert result.results["test_accuracy"] > 30


def test_an_empty_test_set_is_a_user_error(tmp_path, monkeypatch):
    from torch.utils.data import TensorDataset

    from probmask.app import data

    def tiny_data(cfg):
        train = TensorDataset(torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,)))
        empty = TensorDataset(torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.long))
        return data.DataSplits(train, empty, train, 10, (1, 28, 28))

    monkeypatch.setitem(data.DATASETS._items, "empty_test", tiny_data)
    cfg = load_config(None, ["data.name=empty_test", "model.options.hidden=[8]", "train.epochs=1"])
    with pytest.raises(UserError, match="the test set is empty"):
        run_experiment(cfg, tmp_path / "run")
