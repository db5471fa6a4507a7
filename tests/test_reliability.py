"""probmask as a careless, unlucky or hostile user meets it: every mistake is one line on stderr and
exit status 2, never a traceback; nothing that exists is changed; a full disk says so and keeps
the previous checkpoint; a crafted checkpoint is refused without running anything from it.

The fuzz tests draw their cases from a seeded generator, so a failure reproduces.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from cli_util import assert_user_error, run, snapshot
from probmask.app import cli, experiment, rundir
from probmask.app.config import config_to_dict, load_config
from runner_util import TINY

QUICK = [*TINY, "train.epochs=2", "finetune.epochs=1", "data.train_size=256", "data.test_size=100"]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


class Reached(Exception):
    """Raised instead of training: the run got past every check."""


@pytest.fixture
def no_training(monkeypatch):
    def stop(self, resume=False):
        raise Reached

    monkeypatch.setattr(experiment.Experiment, "run", stop)


# ---------------------------------------------------------------------------------- run directories
@pytest.mark.parametrize("entry", rundir.OWNED)
def test_a_directory_holding_any_run_file_is_never_overwritten(entry, tmp_path, capsys):
    out_dir = tmp_path / "old"
    out_dir.mkdir()
    (out_dir / entry).write_bytes(b"precious")
    before = snapshot(tmp_path)
    code, _, err = run(capsys, "run", "-o", out_dir, *QUICK)
    assert_user_error(code, err, str(out_dir), "choose another --out")
    assert snapshot(tmp_path) == before


def _not_a_folder(t: Path) -> Path:
    (t / "file").write_text("x")
    return t / "file"


def _under_a_file(t: Path) -> Path:
    (t / "file").write_text("x")
    return t / "file" / "run"


OUT_PATHS = {
    "an existing file": (_not_a_folder, "exists and is not a directory"),
    "a path under a file": (_under_a_file, "is a file, not a folder"),
    "a pseudo file system": (lambda t: Path("/proc/probmask-test/run"), "cannot create the run directory"),
    "a read-only system folder": (lambda t: Path("/sys/probmask-test"), "cannot create the run directory"),
}


@pytest.mark.parametrize("case", sorted(OUT_PATHS))
def test_bad_output_paths_exit_2_naming_the_path(case, tmp_path, capsys):
    make, expected = OUT_PATHS[case]
    out = make(tmp_path)
    before = snapshot(tmp_path)
    code, _, err = run(capsys, "run", "-o", out, *QUICK)
    assert_user_error(code, err, expected, str(out))
    assert snapshot(tmp_path) == before


def test_a_read_only_folder(tmp_path, capsys):
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
    else:  # root writes anywhere a permission allows: take a read-only file system instead
        folder = Path("/proc/sys")
    code, _, err = run(capsys, "run", "-o", folder / "run", *QUICK)
    assert_user_error(code, err, str(folder))


def test_a_run_that_fails_before_writing_leaves_no_folder(tmp_path, capsys):
    code, _, err = run(capsys, "run", "-o", tmp_path / "a" / "b", "data.name=mnist", f"data.root={tmp_path / 'none'}")
    assert_user_error(code, err, "MNIST not found")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------- the command line
def test_options_and_overrides_in_any_order(tmp_path, capsys):
    code, out, _ = run(capsys, "run", "train.epochs=3", "-q", "finetune.epochs=0", "--print-config",
                       "prune.sparsity=0.5")
    assert code == 0
    cfg = yaml.safe_load(out)
    assert (cfg["train"]["epochs"], cfg["finetune"]["epochs"], cfg["prune"]["sparsity"]) == (3, 0, 0.5)
    with pytest.raises(SystemExit) as exit_:  # an unknown option is still argparse's error
        cli.main(["run", "train.epochs=3", "--bogus", "finetune.epochs=0"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- config files
def _bytes_config(t: Path) -> Path:
    path = t / "latin1.yaml"
    path.write_bytes("train:\n  epochs: 3 # f\xfcnf\n".encode("latin-1"))
    return path


def _dir_config(t: Path) -> Path:
    (t / "configs.yaml").mkdir()
    return t / "configs.yaml"


@pytest.mark.parametrize("make,expected", [(_bytes_config, "is not UTF-8 text (byte 0xfc"),
                                           (_dir_config, "is a directory: pass a YAML file")])
@pytest.mark.parametrize("resume", [False, True])
def test_unreadable_config_files_on_run_and_resume(make, expected, resume, tmp_path, capsys):
    config = make(tmp_path)
    run_dir = tmp_path / "run"
    if resume:
        run_dir.mkdir()
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(load_config(None, QUICK))))
    before = snapshot(tmp_path)
    args = ["--resume", run_dir, "-c", config] if resume else ["-o", run_dir, "-c", config]
    code, _, err = run(capsys, "run", *args)
    assert_user_error(code, err, expected, str(config))
    assert snapshot(tmp_path) == before


def test_a_resumed_run_whose_saved_config_is_not_utf8(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_bytes(b"seed: \xff\n")
    code, _, err = run(capsys, "run", "--resume", run_dir)
    assert_user_error(code, err, "config.yaml is not UTF-8 text")


_VALUES = [-1, 0, 1, 0.5, 1e309, -1e309, float("nan"), "nan", "inf", "", "abc", "\u00e9\u4e2d", "x" * 300, True,
           None, [], [1, "a"], {}, {"a": 1}, {"nested": {"deep": [1, 2]}}, 10**30, -(10**30), 2**63]


def _random_settings(rng: random.Random, keys: list[str]) -> list[tuple[str, object]]:
    """Up to four dotted keys (real or misspelt) with values of any type."""
    out = []
    for _ in range(rng.randint(1, 4)):
        key = rng.choice(keys)
        if rng.random() < 0.15:
            key += rng.choice(["_", "s", ".x"])
        out.append((key, rng.choice(_VALUES)))
    return out


def _nest(settings: list[tuple[str, object]]) -> dict:
    data: dict = {}
    for key, value in settings:
        node = data
        *parents, last = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[last] = value
    return data


def _flow(value: object) -> str:
    """``value`` as YAML on one line, as an override's right-hand side."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("...\n").strip()


def _flat_keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out += _flat_keys(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}")
    return out


@pytest.mark.parametrize("seed", range(4))
def test_fuzzed_configs_never_raise_a_traceback(seed, tmp_path, capsys, no_training):
    """Random settings as a YAML file or as overrides: each run either passes every check (and
    would train) or stops with one line naming the problem; nothing under the folder changes."""
    rng = random.Random(seed)
    keys = _flat_keys(config_to_dict(load_config(None, QUICK)))
    (tmp_path / "keep.txt").write_text("untouched")
    for case in range(12):
        settings = _random_settings(rng, keys)
        if rng.random() < 0.5:
            path = tmp_path / f"c{case}.yaml"
            path.write_text(yaml.safe_dump(_nest(settings), allow_unicode=True))
            args = ["-c", path]
        else:
            args = [f"{k}={_flow(v)}" for k, v in settings]
        before = snapshot(tmp_path)
        try:
            code, _, err = run(capsys, "run", "-q", "-o", tmp_path / f"run{case}", *QUICK, *args)
        except Reached:
            capsys.readouterr()
        else:
            assert_user_error(code, err)
        assert snapshot(tmp_path) == before, settings


# ---------------------------------------------------------------------------------- crafted checkpoints
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main(["run", "-q", "-o", str(out_dir), *QUICK]) == 0
    return out_dir


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def _crafted(state: dict, marker: Path) -> dict[str, object]:
    """Checkpoint contents, each wrong in one way (a callable gets the real state to change)."""
    bad_model = dict(state["model"])
    first = next(iter(bad_model))
    bad_model[first] = torch.zeros(3, 3)
    cases: dict[str, object] = {
        "random bytes": os.urandom(5000),
        "empty": b"",
        "truncated": "truncate",
        "a pickle that runs code": {"version": 2, "payload": _Evil(marker)},
        "a list": [1, 2, 3],
        "the legacy format": "legacy",
        "a folder": "folder",
        "another version": {**state, "version": 99},
        "no config": {k: v for k, v in state.items() if k != "config"},
        "config of the wrong type": {**state, "config": "seed: 0"},
        "phase unknown": {**state, "phase": "warmup"},
        "negative epoch": {**state, "epoch": -3},
        "history of tensors": {**state, "history": [{"loss": torch.ones(2)}]},
        "model weights of other shapes": {**state, "model": bad_model},
        "method state of the wrong kind": {**state, "method": {"scores": "nope"}},
        "optimizer state of the wrong kind": {**state, "phase": "main", "epoch": 1,
                                              "optimizers": {"weights": {"state": 3}}},
        "rng state garbage": {**state, "rng": {"torch": torch.zeros(3, dtype=torch.uint8)}},
    }
    return cases


def test_crafted_checkpoints_are_refused_in_one_line(finished_run, tmp_path, capsys):
    state = torch.load(finished_run / "checkpoint.pt", weights_only=True)
    marker = tmp_path / "marker"
    for name, content in _crafted(state, marker).items():
        run_dir = tmp_path / name.replace(" ", "_")
        shutil.copytree(finished_run, run_dir)
        path = run_dir / "checkpoint.pt"
        if content == "truncate":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        elif content == "legacy":
            torch.save(state, path, _use_new_zipfile_serialization=False)
        elif content == "folder":
            path.unlink()
            path.mkdir()
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            torch.save(content, path)
        for png in run_dir.glob("*.png"):
            png.unlink()  # not needed here; keeps the snapshot small
        before = snapshot(run_dir)
        code, _, err = run(capsys, "run", "-q", "--resume", run_dir)
        assert_user_error(code, err, "checkpoint.pt")
        assert snapshot(run_dir) == before, name
        assert not marker.exists(), name


# ---------------------------------------------------------------------------------- a full disk
@pytest.fixture
def small_disk(tmp_path):
    """A 600 KiB tmpfs: room for one checkpoint of the QUICK run (about 350 KB), not two."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)  # a failed writer may still hold a file


def test_a_full_disk_says_so_and_keeps_the_previous_checkpoint(small_disk, tmp_path, capsys):
    run_dir = small_disk / "run"
    code, _, err = run(capsys, "run", "-q", "-o", run_dir, *QUICK)
    assert_user_error(code, err, f"no space left on {run_dir / 'checkpoint.pt'}")
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)  # the one before, intact
    assert (state["phase"], state["epoch"]) == ("main", 1)
    assert not list(run_dir.glob(".*.tmp"))
    # moved to a roomier disk, the run resumes from it and finishes
    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved)
    assert run(capsys, "run", "-q", "--resume", moved)[0] == 0
    assert (moved / "results.json").is_file()


@pytest.mark.parametrize("how", ["file name", "open file"])
def test_a_full_disk_under_torch_save_is_enospc_naming_the_target(small_disk, how):
    """torch.save reports a full disk as "unexpected pos"; the atomic writer turns it into ENOSPC."""
    import errno

    from probmask.atomic_io import atomic_write, atomic_write_file

    target = small_disk / "model.pt"
    target.write_bytes(b"the previous version")
    big = {"w": torch.zeros(300_000)}  # 1.2 MB
    with pytest.raises(OSError) as info:
        if how == "file name":
            atomic_write(target, lambda tmp: torch.save(big, tmp))
        else:
            atomic_write_file(target, lambda f: torch.save(big, f))
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert target.read_bytes() == b"the previous version"
    assert [p.name for p in small_disk.iterdir()] == ["model.pt"]
