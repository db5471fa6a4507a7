"""Several processes: a 2-process gloo run on the CPU (torchrun, free port) whose ranks end
bit-identical, resume, and write one set of outputs; the context's single-process no-ops."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from probmask.app.distributed import DistContext, ShardSampler
from probmask.app.errors import UserError
from runner_util import TINY

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = {"config.yaml", "metrics.jsonl", "checkpoint.pt", "results.json", "model.pt", "layer_density.png",
           "training.png"}
TIMEOUT_S = 300


def _torchrun(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 ARGS`` (rendezvous on a free port); killed with
    its workers if it takes longer than TIMEOUT_S."""
    path = os.pathsep.join(p for p in (str(ROOT / "tests"), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish in {TIMEOUT_S} s:\n{err[-4000:]}")
    assert proc.returncode == 0 or not check, err[-4000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """tests/dist_worker.py on 2 processes: a straight run, and one stopped and resumed."""
    out = tmp_path_factory.mktemp("dist")
    _torchrun([str(ROOT / "tests" / "dist_worker.py"), str(out)], cwd=out)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    return out, ranks


def test_two_processes_end_bit_identical(two_ranks):
    _, (r0, r1) = two_ranks
    assert (r0["rank"], r1["rank"], r0["world_size"]) == (0, 1, 2)
    steps = 3 * (768 // 64) + 1 * (768 // 64)  # main + finetune steps
    assert len(r0["hashes"]) == steps
    assert r0["hashes"] == r1["hashes"]  # the scores after every projection
    assert len(set(r0["hashes"][: 3 * (768 // 64)])) > 1  # ... which did change
    assert torch.equal(r0["scores"], r1["scores"])
    assert r0["mask"].dtype == torch.bool and torch.equal(r0["mask"], r1["mask"])
    assert 0 < int(r0["mask"].sum()) <= r0["results"]["target_kept"]
    assert _same_state(r0["model"], r1["model"])  # the finalized weights
    timeless = [{k: v for k, v in r["results"].items() if k != "train_time_s"} for r in (r0, r1)]
    assert timeless[0] == timeless[1]  # metrics reduced across ranks: the same numbers
    assert r0["results"]["processes"] == 2
    assert r0["noise_state"] != r1["noise_state"]  # each rank draws its own mask noise
    for count in (1, 3):  # fewer or more forward passes than train.samples: still the same scores
        assert torch.equal(r0["passes"][count], r1["passes"][count])
    assert any("running_mean" in k for k in r0["bn_model"])
    assert _same_state(r0["bn_model"], r1["bn_model"])  # batch-norm buffers included


def test_two_processes_resume_equals_the_straight_run(two_ranks):
    out, (r0, r1) = two_ranks
    keys = ("test_accuracy", "test_loss", "sparsity", "kept", "layers")
    assert {k: r0["resumed_results"][k] for k in keys} == {k: r0["results"][k] for k in keys}
    assert _same_state(r0["resumed_model"], r0["model"])
    assert _same_state(r1["resumed_model"], r1["model"])

    def history(run: Path) -> list[dict]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "time_s"} for line in lines]

    assert history(out / "resumed") == history(out / "straight")


def test_two_processes_write_one_set_of_outputs(two_ranks):
    out, (r0, _) = two_ranks
    assert {p.name for p in out.iterdir()} == {"straight", "resumed", "passes1", "passes3", "batchnorm",
                                               "rank0.pt", "rank1.pt"}
    for run in ("straight", "resumed"):
        assert {p.name for p in (out / run).iterdir()} == OUTPUTS  # and no temporary files
        assert len((out / run / "metrics.jsonl").read_text().splitlines()) == 4  # 3 main + 1 finetune, once
    saved = torch.load(out / "straight" / "model.pt", weights_only=True)
    assert _same_state(saved["state_dict"], r0["model"])
    ckpt = torch.load(out / "straight" / "checkpoint.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng_ranks"]) == 2


def test_torchrun_probmask_run_command(tmp_path):
    """The documented command: one summary, one run directory, rank 0's files only."""
    args = ["-m", "probmask", "run", "--out", "run", "--quiet", *TINY, "train.epochs=1", "finetune.epochs=0"]
    done = _torchrun(args, cwd=tmp_path)
    assert done.stdout.count("probmask run finished") == 1
    assert {p.name for p in tmp_path.iterdir()} == {"run"}
    assert {p.name for p in (tmp_path / "run").iterdir()} == OUTPUTS
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["processes"] == 2 and results["kept"] <= results["target_kept"]


def test_torchrun_reports_a_user_error_once(tmp_path):
    done = _torchrun(["-m", "probmask", "run", "--out", "run", "prune.sparsity=2"], cwd=tmp_path, check=False)
    assert done.returncode != 0
    assert done.stderr.count("probmask: error: prune.sparsity is the fraction of weights removed") == 1
    assert not (tmp_path / "run").exists()


def test_single_process_context_is_a_no_op():
    ctx = DistContext()
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.enabled) == (0, 1, True, False)
    t = torch.tensor([1.0, 2.0])
    assert ctx.all_reduce_sum_(t) is t and t.tolist() == [1.0, 2.0]
    p = torch.ones(3, requires_grad=True)
    ctx.average_gradients([p])
    assert p.grad is None
    assert ctx.broadcast_object({"a": 1}) == {"a": 1} and ctx.all_gather_object(3) == [3]
    assert ctx.on_main(lambda: 5) == 5

    def fail() -> None:
        raise UserError("bad")

    with pytest.raises(UserError, match="bad"):
        ctx.on_main(fail)
    ctx.assert_same([t], "nothing")
    ctx.barrier()
    ctx.close()


def test_from_env_without_torchrun_is_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert DistContext.from_env() == DistContext()


def test_shard_sampler_partitions_the_data_exactly():
    shards = [list(ShardSampler(10, r, 3)) for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert sorted(i for s in shards for i in s) == list(range(10))
    assert [len(ShardSampler(2, r, 3)) for r in range(3)] == [1, 1, 0]


def test_global_batch_must_split_evenly(tmp_path):
    from probmask.app.config import load_config
    from probmask.app.experiment import Experiment

    cfg = load_config(None, [*TINY, "train.batch_size=63"])
    with pytest.raises(UserError, match="train.batch_size=63 is the global batch and must be divisible by the "
                                        r"number of processes \(2\)"):
        Experiment(cfg, tmp_path / "run", dist=DistContext(rank=0, world_size=2))
