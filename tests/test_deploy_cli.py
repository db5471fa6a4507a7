"""``probmask export`` / ``probmask eval``: every format from a run directory, and every bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from cli_util import assert_user_error, run
from deploy_util import prune
from probmask import export
from probmask.app.cli import main
from probmask.app.config import config_to_dict, load_config
from probmask.app.models import build_model

LENET_WEIGHTS = 784 * 300 + 300 * 100 + 100 * 10


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished run directory as the runner writes it: model.pt with the runner's metadata."""
    root = tmp_path_factory.mktemp("run")
    cfg = load_config(overrides=["prune.sparsity=0.95"])
    model, masks = prune(build_model("lenet300", 10, [1, 28, 28]), 0.95)
    meta = {"model": "lenet300", "model_options": {}, "num_classes": 10, "input_shape": [1, 28, 28],
            "data": "mnist5k", "method": "probmask", "config": config_to_dict(cfg)}
    export.save_pt(export.Checkpoint(model.state_dict(), masks, meta), root / "model.pt")
    (root / "results.json").write_text(json.dumps({"sparsity": 0.95}))
    return root


@pytest.mark.parametrize("fmt", ["pt", "safetensors", "sparse"])
def test_export_weight_formats(capsys, run_dir, fmt, tmp_path):
    out_file = tmp_path / f"lenet.{fmt}"
    code, out, err = run(capsys, "export", run_dir, "--format", fmt, "--out", out_file)
    assert code == 0, err
    assert f"wrote {out_file}" in out
    original = export.load(run_dir / "model.pt")
    back = export.load(out_file)
    for k, v in original.state_dict.items():
        assert torch.equal(back.state_dict[k], v)
    assert back.meta["model"] == "lenet300" and back.meta["config"]["prune"]["sparsity"] == 0.95
    if fmt == "sparse":
        assert out_file.stat().st_size * 5 < (run_dir / "model.pt").stat().st_size


def test_export_default_output_goes_to_the_run_directory(capsys, run_dir):
    code, out, err = run(capsys, "export", run_dir, "--format", "sparse")
    assert code == 0, err
    target = run_dir / "export" / "model.sparse.safetensors"
    assert target.is_file() and str(target) in out
    shutil.rmtree(run_dir / "export")


def test_export_onnx_checks_with_onnxruntime(capsys, run_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    code, out, err = run(capsys, "export", run_dir, "--format", "onnx", "--out", tmp_path / "m.onnx")
    assert code == 0, err
    assert "onnxruntime matches PyTorch" in out
    assert (tmp_path / "m.onnx").stat().st_size > 4 * LENET_WEIGHTS


def test_eval_run_directory_and_exported_file_agree(capsys, run_dir, tmp_path):
    code, out, err = run(capsys, "eval", run_dir, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["total"] == LENET_WEIGHTS
    assert report["sparsity"] == pytest.approx(0.95, abs=1e-6)
    assert report["dense_macs"] == LENET_WEIGHTS
    assert report["effective_macs"] == report["kept"]
    assert report["sparse_bytes"] * 5 < report["dense_bytes"]
    assert 0.0 <= report["test_accuracy"] <= 100.0  # on the bundled MNIST test split
    assert [m["name"] for m in report["mac_layers"]] == ["1", "3", "5"]

    export.save_sparse(export.load(run_dir / "model.pt"), tmp_path / "m.sparse")
    code, out, err = run(capsys, "eval", tmp_path / "m.sparse", "--json", "--no-accuracy")
    assert code == 0, err
    again = json.loads(out)
    assert again["test_accuracy"] is None
    for key in ("sparsity", "kept", "dense_bytes", "sparse_bytes", "dense_macs", "effective_macs"):
        assert again[key] == report[key]


def test_eval_prints_a_table(capsys, run_dir):
    code, out, err = run(capsys, "eval", run_dir, "--no-accuracy")
    assert code == 0, err
    assert "lenet300 on mnist5k" in out and "effective MACs" in out and "sparsity" in out


def test_eval_without_data_still_reports_the_rest(capsys, run_dir, tmp_path):
    """The data set is the file's (a name only); where it lives is the command line's --data-root."""
    ckpt = export.load(run_dir / "model.pt")
    ckpt.meta["data"] = "cifar10"
    export.save_pt(ckpt, tmp_path / "m.pt")
    code, out, err = run(capsys, "eval", tmp_path / "m.pt", "--data-root", tmp_path / "nowhere")
    assert code == 0
    assert "test accuracy not measured" in err and "--data-root" in err and "--download" in err
    assert "sparsity" in out
    assert not (tmp_path / "nowhere").exists()


def test_eval_data_set_from_the_command_line(capsys, run_dir, tmp_path):
    ckpt = export.load(run_dir / "model.pt")
    ckpt.meta["data"] = "not a data set"
    export.save_pt(ckpt, tmp_path / "m.pt")
    code, out, err = run(capsys, "eval", tmp_path / "m.pt")
    assert code == 0 and "pass --data NAME" in err and "no registered data set" in out
    code, out, err = run(capsys, "eval", tmp_path / "m.pt", "--data", "mnist5k", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["data"] == "mnist5k" and 0.0 <= report["test_accuracy"] <= 100.0
    code, out, err = run(capsys, "eval", tmp_path / "m.pt", "--data", "cifar10", "--data-root", tmp_path / "none")
    assert code == 0 and "the cifar10 examples are [3, 32, 32]" not in err and "not found" in err
    code, _, err = run(capsys, "eval", tmp_path / "m.pt", "--data", "mnist55k")
    assert_user_error(code, err, "unknown data set", "mnist5k")


# ---------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("command", [["eval"], ["export", "--format", "sparse"]])
def test_run_directory_without_a_model(capsys, tmp_path, command):
    code, _, err = run(capsys, command[0], tmp_path, *command[1:])
    assert_user_error(code, err, "has no model.pt", "not finished")


@pytest.mark.parametrize("command", [["eval"], ["export", "--format", "onnx"]])
def test_truncated_model_file(capsys, run_dir, tmp_path, command):
    data = (run_dir / "model.pt").read_bytes()
    (tmp_path / "model.pt").write_bytes(data[: len(data) // 2])
    code, _, err = run(capsys, command[0], tmp_path, *command[1:])
    assert_user_error(code, err, "corrupted or truncated")


def test_garbage_and_missing_files(capsys, tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(os.urandom(300))
    code, _, err = run(capsys, "eval", tmp_path / "junk.safetensors")
    assert_user_error(code, err)
    code, _, err = run(capsys, "eval", tmp_path / "missing.pt")
    assert_user_error(code, err, "does not exist")


def test_file_for_a_different_architecture(capsys, run_dir, tmp_path):
    ckpt = export.load(run_dir / "model.pt")
    ckpt.meta["model_options"] = {"hidden": [200, 100]}  # the weights are 784-300-100-10
    export.save_pt(ckpt, tmp_path / "other.pt")
    code, _, err = run(capsys, "eval", tmp_path / "other.pt")
    assert_user_error(code, err, "does not fit", "shape mismatch")
    code, _, err = run(capsys, "export", tmp_path / "other.pt", "--format", "sparse")
    assert_user_error(code, err, "does not fit")

    ckpt.meta["model"] = "no_such_model"
    export.save_pt(ckpt, tmp_path / "unknown.pt")
    code, _, err = run(capsys, "eval", tmp_path / "unknown.pt")
    assert_user_error(code, err, "unknown model")


def test_file_without_metadata_cannot_be_rebuilt(capsys, run_dir, tmp_path):
    ckpt = export.load(run_dir / "model.pt")
    torch.save({"state_dict": ckpt.state_dict, "masks": ckpt.masks, "meta": {}}, tmp_path / "bare.pt")
    code, _, err = run(capsys, "eval", tmp_path / "bare.pt")
    assert_user_error(code, err, "cannot be rebuilt")


def test_export_refuses_to_overwrite_its_input(capsys, run_dir, tmp_path):
    shutil.copy(run_dir / "model.pt", tmp_path / "model.pt")
    code, _, err = run(capsys, "export", tmp_path / "model.pt", "--format", "pt")
    assert_user_error(code, err, "overwrite")


def test_exit_status_of_a_real_process(run_dir, tmp_path):
    """The status is the process's, and no traceback reaches the terminal."""
    proc = subprocess.run([sys.executable, "-m", "probmask", "eval", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "has no model.pt" in proc.stderr


def test_end_to_end_through_probmask_run(tmp_path, capsys):
    """A real (tiny) ``probmask run``, then ``probmask eval`` / ``export`` on its directory."""
    from probmask.app.cli import main as probmask_main

    out = tmp_path / "run"
    # the whole test split: eval measures on it, whatever subset the run's config names
    code = probmask_main(["run", "--out", str(out), "--quiet", "train.epochs=1", "finetune.epochs=1",
                          "data.train_size=256"])
    assert code == 0
    capsys.readouterr()
    results = json.loads((out / "results.json").read_text())

    assert probmask_main(["eval", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["test_accuracy"] == pytest.approx(results["test_accuracy"])
    assert report["recorded_test_accuracy"] == pytest.approx(results["test_accuracy"])
    assert report["sparsity"] == pytest.approx(results["sparsity"])
    assert report["kept"] == results["kept"] == report["effective_macs"]

    assert probmask_main(["export", str(out), "--format", "sparse"]) == 0
    sparse_file = out / "export" / "model.sparse.safetensors"
    assert sparse_file.stat().st_size * 10 <= (out / "model.pt").stat().st_size
    original = export.load(out / "model.pt")
    back = export.load(sparse_file)
    assert all(torch.equal(back.state_dict[k], v) for k, v in original.state_dict.items())
    umask = os.umask(0)
    os.umask(umask)
    assert sparse_file.stat().st_mode & 0o777 == 0o666 & ~umask  # the usual mode, not mkstemp's 0600


def test_readme_recipe_without_probmask(run_dir, tmp_path):
    """The README's snippet: LeNet-300-100 written by hand, weights loaded with plain torch."""
    from safetensors.torch import load_file
    from torch import nn

    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                          nn.Linear(100, 10))
    ckpt = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(ckpt["state_dict"])
    assert ckpt["meta"]["model"] == "lenet300"
    assert int(ckpt["masks"]["1.weight"].sum()) == int((model[1].weight != 0).sum())

    assert main(["export", str(run_dir), "--format", "safetensors", "--out", str(tmp_path / "m.safetensors")]) == 0
    tensors = load_file(tmp_path / "m.safetensors")
    again = nn.Sequential(*[type(m)() if not isinstance(m, nn.Linear) else nn.Linear(m.in_features, m.out_features)
                            for m in model])
    again.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("masks/")})
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(again(x), model(x))


def test_malformed_metadata(capsys, run_dir, tmp_path):
    ckpt = export.load(run_dir / "model.pt")
    for i, (key, value, needle) in enumerate([("input_shape", [3, 32, 32], "does not fit"),
                                              ("input_shape", "abc", "malformed"),
                                              ("num_classes", None, "malformed")]):
        meta = dict(ckpt.meta)
        meta[key] = value
        export.save_pt(export.Checkpoint(ckpt.state_dict, ckpt.masks, meta), tmp_path / f"m{i}.pt")
        code, _, err = run(capsys, "eval", tmp_path / f"m{i}.pt")
        assert_user_error(code, err, needle)
