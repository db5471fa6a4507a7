"""benchmarks/sweep.py end to end in its --quick --dry form: every method, the outputs, and reuse."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _sweep_module():
    spec = importlib.util.spec_from_file_location("sweep", ROOT / "benchmarks" / "sweep.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_dry_sweep_runs_end_to_end_and_reuses_finished_runs(tmp_path, capsys):
    sweep = _sweep_module()
    before = torch.get_num_threads()
    out = tmp_path / "sweep"
    assert sweep.main(["--quick", "--dry", "--jobs", "1", "--out", str(out)]) == 0
    assert torch.get_num_threads() == before
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    methods = set(sweep.METHODS)
    assert {r["method"] for r in rows} == methods
    assert len(rows) == len(methods) * len(sweep.QUICK_SPARSITIES)  # dense: one run, a row per sparsity
    for r in rows:
        if r["method"] != "dense":
            assert int(r["kept"]) == int(r["target_kept"]) < int(r["total"])
    table = (out / "results.md").read_text()
    assert "| 90% |" in table and "| 99% |" in table and "probmask_sm" in table
    for png in ("accuracy_vs_density.png", "layer_density.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = list((out / "runs").glob("*/*/seed0/results.json"))
    assert len(runs) == len(methods) * len(sweep.QUICK_SPARSITIES) - 1

    capsys.readouterr()
    assert sweep.main(["--quick", "--dry", "--jobs", "1", "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert log.count("reused") == len(runs) and "test" in log

    # a finished run of another config is never passed off as this one's
    assert sweep.main(["--quick", "--dry", "--jobs", "1", "--out", str(out), "--set", "train.lr=0.05"]) == 2
    assert "holds a finished run of another config" in capsys.readouterr().err
    assert sweep.main(["--quick", "--dry", "--out", str(out), "--set", "train.nope=1"]) == 2


def test_method_set_applies_to_that_method_only(tmp_path, capsys):
    sweep = _sweep_module()
    out = tmp_path / "sweep"
    argv = ["--dry", "--jobs", "1", "--out", str(out), "--methods", "probmask", "gmp", "--sparsities", "0.9",
            "--seeds", "0", "--method-set", "gmp:train.lr=0.03"]
    assert sweep.main(argv) == 0

    def lr(method: str) -> float:
        return yaml.safe_load((out / "runs" / method / "s0.9" / "seed0" / "config.yaml").read_text())["train"]["lr"]

    assert lr("gmp") == 0.03 and lr("probmask") == 0.1
    assert "gmp: `train.lr=0.03`" in (out / "results.md").read_text()
    with pytest.raises(SystemExit):
        sweep.main([*argv[:-1], "nomethod:train.lr=1"])
    assert "METHOD:KEY=VALUE" in capsys.readouterr().err
    assert sweep.main([*argv[:-1], "gmp:train.nope=1"]) == 2
