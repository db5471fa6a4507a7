"""One rank of the two-process Trainer test: ``torchrun --nproc_per_node 2 hf_dist_worker.py OUT``.

Trains the tiny BERT of test_integration_transformers with ProbMaskCallback under DDP (gloo) and
writes this rank's scores, mask and final weights to ``OUT/rank<r>.pt``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import Trainer

from probmask.integrations.transformers import ProbMaskCallback
from test_integration_transformers import Tokens, arguments, kept, tiny_bert


def main(out: Path) -> None:
    callback = ProbMaskCallback(0.9)
    model = tiny_bert()
    args = arguments(out / "trainer", max_steps=8, ddp_backend="gloo", per_device_train_batch_size=8)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(128), callbacks=[callback])
    trainer.train()
    rank, world = dist.get_rank(), dist.get_world_size()
    pm = callback.probmask
    torch.save({"world": world, "scores": pm.scores.detach().clone(), "mask": pm.mask.clone(),
                "kept": kept(model, callback), "target": pm.target_kept,
                "weights": {k: v.clone() for k, v in model.state_dict().items()}}, out / f"rank{rank}.pt")
    if rank == 0:
        (out / "done.json").write_text(json.dumps({"steps": trainer.state.global_step}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
