"""The ``probmask`` command: the default config, end-to-end runs, subcommand registration, and
every user error (one line on stderr, exit status 2, no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from probmask.app import cli
from probmask.app.cli import build_parser, main
from probmask.app.config import ExperimentConfig, config_to_dict, load_config
from probmask.app.errors import UserError
from runner_util import TINY

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------- configs
def test_default_job_is_the_mnist5k_config():
    assert load_config() == ExperimentConfig()
    assert load_config(ROOT / "configs" / "mnist5k_lenet300.yaml") == ExperimentConfig()
    cfg = ExperimentConfig()
    assert (cfg.model.name, cfg.data.name, cfg.prune.sparsity, cfg.prune.method) == ("lenet300", "mnist5k", 0.99, "probmask")


def test_print_config_shows_every_key(capsys):
    code, out, _ = run(capsys, "run", "--print-config")
    assert code == 0
    assert yaml.safe_load(out) == config_to_dict(ExperimentConfig())


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load_and_say_what_the_paper_reports(path):
    cfg = load_config(path)
    text = path.read_text()
    assert "paper" in text.lower()
    if path.stem.startswith("cifar"):
        t = cfg.train
        assert (t.epochs, t.batch_size, t.lr, t.score_lr, t.samples) == (300, 256, 0.1, 6e-3, 2)
        assert cfg.finetune.epochs == 20 and cfg.data.name in ("cifar10", "cifar100")
        assert cfg.model.name in ("resnet32", "vgg19_bn") and cfg.model.name in path.stem
        assert "What the paper reports" in text
    if path.stem.startswith("imagenet"):
        assert cfg.model.name == "torchvision:resnet50" and cfg.prune.sparsity == 0.9
        assert "74.68%" in text


def test_yaml_file_then_overrides(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  epochs: 7\n  batch_size: 32\nprune:\n  sparsity: 0.95\n")
    code, out, _ = run(capsys, "run", "--config", config, "train.epochs=2", "model.width=16", "--print-config")
    assert code == 0
    shown = yaml.safe_load(out)
    assert shown["train"]["epochs"] == 2 and shown["train"]["batch_size"] == 32  # override wins, file beats default
    assert shown["prune"]["sparsity"] == 0.95 and shown["model"]["width"] == 16
    assert shown["train"]["lr"] == 0.1  # untouched keys keep their defaults


# ---------------------------------------------------------------------------------- runs
def test_run_end_to_end_with_a_readable_summary(tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out, err = run(capsys, "run", "--out", out_dir, *TINY)
    assert code == 0, err
    results = json.loads((out_dir / "results.json").read_text())
    assert f"test accuracy  {results['test_accuracy']:.2f}%" in out
    assert f"sparsity       {100 * results['sparsity']:.2f}%" in out
    for layer in results["layers"]:  # the per-layer table
        assert layer["name"] in out and str(layer["numel"]) in out
    assert f"outputs in {out_dir}/" in out and "results.json" in out and "model.pt" in out
    # progress: one line per epoch on stderr, no tqdm bar when stderr is not a terminal
    assert "main     epoch 1/4" in err and "finetune epoch 2/2" in err
    assert "\r" not in err
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6


def test_quiet_run_prints_only_the_summary(tmp_path, capsys):
    code, out, err = run(capsys, "run", "--quiet", "--out", tmp_path / "run", *TINY, "train.epochs=1",
                         "finetune.epochs=0")
    assert code == 0
    assert err == ""
    assert "test accuracy" in out


def test_resume_of_a_finished_run_from_the_command_line(tmp_path, capsys):
    out_dir = tmp_path / "run"
    assert run(capsys, "run", "-q", "--out", out_dir, *TINY, "train.epochs=1", "finetune.epochs=1")[0] == 0
    first = json.loads((out_dir / "results.json").read_text())
    # the same overrides again are not "another config"
    code, out, err = run(capsys, "run", "-q", "--resume", out_dir, *TINY, "train.epochs=1", "finetune.epochs=1")
    assert code == 0, err
    assert json.loads((out_dir / "results.json").read_text())["test_accuracy"] == first["test_accuracy"]


def test_python_dash_m_and_the_console_script(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "probmask", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0
    for command in ("run", "export", "eval"):
        assert command in proc.stdout
    script = Path(sys.executable).with_name("probmask")
    if script.exists():  # installed entry point: a user error from a real process
        proc = subprocess.run([str(script), "run", "model.name=nope"], capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 2
        assert proc.stderr.startswith("probmask: error: unknown model 'nope'")
        assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_readme_recipe_for_your_own_model(tmp_path):
    """The README's my_run.py, verbatim: a registered model trains through the command line."""
    readme = (ROOT / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in readme.split("```python\n")[1:]]
    script = next(b for b in blocks if b.startswith("# my_run.py"))
    (tmp_path / "my_run.py").write_text(script)
    argv = ["run", "--quiet", "--out", "out", "model.name=my_mlp", "model.options.hidden=16", "threads=1",
            "data.train_size=256", "data.test_size=100", "train.epochs=2", "finetune.epochs=1", "prune.sparsity=0.9"]
    proc = subprocess.run([sys.executable, "my_run.py", *argv], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [layer["name"] for layer in results["layers"]] == ["1.weight", "3.weight"]
    assert results["kept"] == int(0.1 * results["total"] + 1e-6)


# ---------------------------------------------------------------------------------- registrars
def test_subcommands_come_from_registrars(monkeypatch, capsys):
    names = set(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    assert {"run", "export", "eval"} <= names  # export / eval from probmask.app.deploy_cli

    def register(subparsers):
        p = subparsers.add_parser("hello")
        p.add_argument("--fail", action="store_true")

        def hello(args):
            if args.fail:
                raise UserError("hello failed: try without --fail")
            print("hi")
            return 0

        p.set_defaults(func=hello)

    monkeypatch.setattr(cli, "REGISTRARS", [*cli.REGISTRARS, register])
    assert run(capsys, "hello")[:2] == (0, "hi\n")
    assert run(capsys, "hello", "--fail") == (2, "", "probmask: error: hello failed: try without --fail\n")


def test_interrupt_says_how_to_resume_once_the_run_has_started(monkeypatch, tmp_path, capsys):
    import probmask.app.experiment

    def interrupted(cfg, run_dir, **kwargs):
        (run_dir / "config.yaml").write_text("seed: 0\n")  # what a started run writes first
        raise KeyboardInterrupt

    monkeypatch.setattr(probmask.app.experiment, "run_experiment", interrupted)
    code, _, err = run(capsys, "run", "--out", tmp_path / "r")
    assert code == 130
    assert err == f"probmask: interrupted; continue with: probmask run --resume {tmp_path / 'r'}\n"


def test_interrupt_before_the_run_started_leaves_no_directory_and_no_hint(monkeypatch, tmp_path, capsys):
    import probmask.app.experiment

    def interrupted(*args, **kwargs):  # e.g. while the data set loads
        raise KeyboardInterrupt

    monkeypatch.setattr(probmask.app.experiment, "run_experiment", interrupted)
    code, _, err = run(capsys, "run", "--out", tmp_path / "a" / "r")
    assert (code, err) == (130, "probmask: interrupted\n")
    assert list(tmp_path.iterdir()) == []  # the folders it had created are gone again


def test_interrupt_during_start_up_imports_prints_no_traceback(monkeypatch, capsys):
    def interrupted(subparsers):  # stands for Ctrl-C while deploy_cli imports torch
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "REGISTRARS", [interrupted])
    assert run(capsys, "run") == (130, "", "probmask: interrupted\n")


def test_the_entry_point_imports_nothing_heavy_before_main_runs():
    code = "import sys, probmask.app.cli; print(sorted(m for m in ('torch', 'numpy', 'omegaconf') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------------------- user errors
def _bad_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: [1, 2\n")
    return path


def _list_yaml(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    return path


def _unknown_key_yaml(tmp_path):
    path = tmp_path / "unknown.yaml"
    path.write_text("train:\n  epoch: 3\n")
    return path


USER_ERRORS = {
    "unknown model": (lambda t: ["model.name=resnet33"],
                      "unknown model 'resnet33': choose one of lenet300, lenet5, resnet32, vgg19_bn"),
    "unknown torchvision model": (lambda t: ["model.name=torchvision:resnet05"], "did you mean torchvision:resnet50"),
    "unknown data set": (lambda t: ["data.name=svhn"], "unknown data set 'svhn': choose one of cifar10, cifar100"),
    "unknown key": (lambda t: ["train.epoch=3"], "overrides: Key 'epoch' not in 'TrainConfig'"),
    "unknown section": (lambda t: ["optim.lr=3"], "Key 'optim' not in 'ExperimentConfig'"),
    "wrong type": (lambda t: ["train.epochs=many"], "Value 'many' of type 'str' could not be converted to Integer"),
    "not key=value": (lambda t: ["epochs"], "override 'epochs' must look like key=value"),
    "sparsity above 1": (lambda t: ["prune.sparsity=1.5"], "prune.sparsity is the fraction of weights removed"),
    "sparsity 1": (lambda t: ["prune.sparsity=1"], "must lie in (0, 1), got 1.0"),
    "sparsity 0": (lambda t: ["prune.sparsity=0"], "must lie in (0, 1), got 0.0 (float; e.g. 0.99 keeps 1%)"),
    "unknown method": (lambda t: ["prune.method=snip"],
                       "unknown prune.method 'snip': choose one of dense, edgepopup, gmp, gmp_uniform, oneshot, probmask"),
    "misspelt method": (lambda t: ["prune.method=probmak"], "(did you mean 'probmask'?)"),
    "unknown fix": (lambda t: ["prune.fix=best"], "prune.fix must be 'topk' or 'sample', got 'best'"),
    "zero epochs": (lambda t: ["train.epochs=0"], "train.epochs must be at least 1"),
    "bad device": (lambda t: ["device=tpu"], "device must be auto, cpu, cuda or cuda:N"),
    "zero threads": (lambda t: ["threads=0"], "threads must be at least 1 or null"),
    "floors above the budget": (lambda t: ["prune.floor=unit", "prune.sparsity=0.9999"],
                                "prune (probmask): the per-layer floors keep 410 weights but the budget"),
    "unknown model option": (lambda t: ["model.width=16"], "model lenet300 has no option width"),
    "model does not fit data": (lambda t: ["model.name=torchvision:resnet18"],
                                "does not accept this data's examples of shape [1, 28, 28]"),
    "missing cifar": (lambda t: ["data.name=cifar10", f"data.root={t / 'nowhere'}"],
                      "CIFAR-10 not found under data.root="),
    "missing imagenet": (lambda t: ["data.name=imagenet", f"data.root={t / 'nowhere'}"],
                         "ImageNet needs data.root with train/ and val/ folders"),
    "bad yaml": (lambda t: ["--config", _bad_yaml(t)], "is not valid YAML at line 3"),
    "yaml not a mapping": (lambda t: ["--config", _list_yaml(t)], "must hold a mapping of keys"),
    "yaml unknown key": (lambda t: ["--config", _unknown_key_yaml(t)], "Key 'epoch' not in 'TrainConfig'"),
    "missing config file": (lambda t: ["--config", t / "nope.yaml"], "nope.yaml does not exist"),
    "resume a non-run": (lambda t: ["--resume", t], "is not a run directory (no config.yaml): nothing to resume"),
    "resume and out differ": (lambda t: ["--resume", t / "a", "--out", t / "b"], "--out and --resume name different"),
}


@pytest.mark.parametrize("case", sorted(USER_ERRORS))
def test_user_errors_exit_2_with_one_line(case, tmp_path, capsys):
    make_args, expected = USER_ERRORS[case]
    args = [str(a) for a in make_args(tmp_path)]
    if "--resume" not in args:
        args += ["--out", str(tmp_path / "run")]
    code, out, err = run(capsys, "run", *args)
    assert code == 2
    assert err.startswith("probmask: error: ") and err.count("\n") == 1, err
    assert expected in err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "results.json").exists()


def test_cuda_requested_without_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = run(capsys, "run", "--out", tmp_path / "r", "device=cuda")
    assert code == 2 and "device=cuda but no CUDA device is available here" in err


def _finished_tiny_run(tmp_path, capsys) -> Path:
    out_dir = tmp_path / "run"
    assert run(capsys, "run", "-q", "--out", out_dir, *TINY, "train.epochs=1", "finetune.epochs=0")[0] == 0
    return out_dir


def test_resume_with_another_config_is_refused(tmp_path, capsys):
    out_dir = _finished_tiny_run(tmp_path, capsys)
    code, _, err = run(capsys, "run", "--resume", out_dir, "prune.sparsity=0.8")
    assert code == 2
    assert "was run with another config (prune.sparsity: 0.9 in the run, 0.8 requested)" in err
    other = tmp_path / "other.yaml"
    other.write_text("train:\n  epochs: 9\n")
    code, _, err = run(capsys, "run", "--resume", out_dir, "--config", other)
    assert code == 2 and "was run with another config (data.test_size: 200 in the run, None requested" in err


def test_a_new_run_into_an_existing_run_is_refused(tmp_path, capsys):
    out_dir = _finished_tiny_run(tmp_path, capsys)
    before = (out_dir / "results.json").read_bytes()
    code, _, err = run(capsys, "run", "--out", out_dir, *TINY)
    assert code == 2
    assert f"{out_dir} already holds a run: continue it with --resume {out_dir}" in err
    assert (out_dir / "results.json").read_bytes() == before
