"""Run under ``torchrun --nproc_per_node=2`` by tests/test_distributed.py: a tiny run straight
through, and the same run stopped after its first epoch and resumed, in one process group.

Every rank saves what it ended with to ``OUT/rank<r>.pt``: a hash of the scores after every
projection, the final scores and fixed mask, the finalized weights and the results, so the test
can check that the ranks agree bit for bit and that the resumed run equals the straight one.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch

from probmask.app.config import load_config
from probmask.app.distributed import DistContext
from probmask.app.experiment import Experiment
from probmask.sparsifier import accumulate_samples
from runner_util import TINY

OVERRIDES = [*TINY, "train.epochs=3", "finetune.epochs=1", "prune.fix=sample", "prune.fix_samples=3",
             "prune.fix_batches=2"]


class Stop(Exception):
    pass


def score_hashes(exp: Experiment) -> list[str]:
    """Records a hash of the scores after every projection (the method's step)."""
    hashes: list[str] = []
    original = exp.method.step

    def step() -> None:
        original()
        scores = exp.method.scores.detach()  # type: ignore[attr-defined]
        hashes.append(hashlib.sha256(scores.numpy().tobytes()).hexdigest())

    exp.method.step = step  # type: ignore[method-assign]
    return hashes


def main() -> None:
    out = Path(sys.argv[1])
    dist = DistContext.from_env(timeout_s=120)
    try:
        cfg = load_config(None, OVERRIDES)
        straight = Experiment(cfg, out / "straight", dist=dist)
        noise_state = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()  # per rank
        hashes = score_hashes(straight)
        result = straight.run()
        pm = straight.method  # type: ignore[attr-defined]

        def stop(record: dict) -> None:
            if record["phase"] == "main" and record["epoch"] == 0:
                raise Stop

        try:
            Experiment(cfg, out / "resumed", dist=dist, on_epoch_end=stop).run()
        except Stop:
            pass
        again = Experiment(cfg, out / "resumed", dist=dist)
        resumed = again.run(resume=True)
        # a method that makes fewer (1) or more (3) forward passes per batch than train.samples=2:
        # the gradients are averaged after backward, or by DDP in every pass from the second on
        passes = {}
        for count in (1, 3):
            short = load_config(None, [*TINY, "train.epochs=1", "finetune.epochs=0"])
            exp = Experiment(short, out / f"passes{count}", dist=dist)
            exp.method.backward = lambda loss_fn, samples, count=count: accumulate_samples(  # type: ignore[method-assign]
                loss_fn, count)
            exp.run()
            passes[count] = exp.method.scores.detach().clone()  # type: ignore[attr-defined]
        # batch norm: running statistics follow each rank's batches; rank 0's are broadcast
        bn_cfg = load_config(None, ["model.name=resnet32", "model.width=2", "data.train_size=128",
                                    "data.test_size=32", "train.batch_size=32", "train.epochs=1",
                                    "finetune.epochs=1", "prune.sparsity=0.9"])
        bn = Experiment(bn_cfg, out / "batchnorm", dist=dist)
        bn.run()
        torch.save({
            "bn_model": bn.model.state_dict(),
            "noise_state": noise_state,
            "passes": passes,
            "rank": dist.rank,
            "world_size": dist.world_size,
            "hashes": hashes,
            "scores": pm.scores.detach().clone(),
            "mask": pm.fixed_mask.clone(),
            "model": straight.model.state_dict(),
            "results": result.results,
            "resumed_results": resumed.results,
            "resumed_model": again.model.state_dict(),
        }, out / f"rank{dist.rank}.pt")
    finally:
        dist.close()


if __name__ == "__main__":
    main()
