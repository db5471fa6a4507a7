"""The epoch loop and the optimizers of a run.

:class:`Loop` runs training epochs (each minibatch: the method's passes, the gradient clip, the
optimizer steps, the method's ``step()``, the schedulers) and evaluations, on one process or as
one of several (``torchrun``): then the module is wrapped in ``DistributedDataParallel``, the
gradients of the method's scores (outside the module) are averaged, and metrics are summed over
the processes, so every process takes the same steps and returns the same numbers.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from probmask.app.config import DataConfig, FinetuneConfig, TrainConfig
from probmask.app.data import DataSplits
from probmask.app.distributed import DistContext, ShardSampler
from probmask.app.errors import UserError
from probmask.masked import MaskedModel

__all__ = ["Loaders", "Loop", "Optimizers", "finetune_optimizers", "main_optimizers"]

Optimizers = tuple[dict[str, torch.optim.Optimizer], dict[str, LRScheduler]]


@dataclass
class Loaders:
    """The three loaders of a run, shuffled by (seed, phase, epoch) only, so a resumed run sees the
    same batches. With several processes each loads its share of every set."""

    train: DataLoader
    test: DataLoader
    train_eval: DataLoader  # the training examples without augmentation, to score candidate masks
    sampler: DistributedSampler | None
    generator: torch.Generator

    @classmethod
    def build(cls, data: DataSplits, batch_size: int, cfg: DataConfig, dist: DistContext,
              device: torch.device) -> Loaders:
        world = dist.world_size
        if batch_size % world:
            raise UserError(f"train.batch_size={batch_size} is the global batch and must be divisible "
                            f"by the number of processes ({world})")
        batch = batch_size // world
        workers = cfg.num_workers
        common: dict[str, Any] = {"num_workers": workers, "pin_memory": device.type == "cuda"}
        generator = torch.Generator()
        if dist.enabled:
            sampler = DistributedSampler(data.train, num_replicas=world, rank=dist.rank, shuffle=True, seed=0)
            train = DataLoader(data.train, batch_size=batch, sampler=sampler, drop_last=len(sampler) > batch,
                               persistent_workers=workers > 0, **common)
            test = DataLoader(data.test, batch_size=batch, sampler=ShardSampler(len(data.test), dist.rank, world),
                              persistent_workers=workers > 0, **common)
            train_eval = DataLoader(data.train_eval, batch_size=batch,
                                    sampler=ShardSampler(len(data.train_eval), dist.rank, world), **common)
            return cls(train, test, train_eval, sampler, generator)
        train = DataLoader(data.train, batch_size=batch, shuffle=True, generator=generator,
                           drop_last=len(data.train) > batch, persistent_workers=workers > 0, **common)
        test = DataLoader(data.test, batch_size=batch, persistent_workers=workers > 0, **common)
        train_eval = DataLoader(data.train_eval, batch_size=batch, **common)  # used once
        return cls(train, test, train_eval, None, generator)

    def seed_epoch(self, seed: int, phase: str, epoch: int) -> None:
        """The shuffling order of this epoch depends on (seed, phase, epoch) only."""
        value = seed * 10_000_019 + (0 if phase == "main" else 1_000_000) + epoch
        if self.sampler is not None:
            self.sampler.set_epoch(value)  # its permutation is seeded with seed + epoch, here 0 + this
        else:
            self.generator.manual_seed(value)


def _fused(device: torch.device) -> bool | None:
    """Fused optimizer steps (one kernel over all parameters; on the CPU measured 2.3x faster for
    Adam on LeNet-300-100's scores) where PyTorch has them, else its default."""
    return True if device.type in ("cpu", "cuda") else None


def _cosine(opts: dict[str, torch.optim.Optimizer], steps: int) -> Optimizers:
    return opts, {k: CosineAnnealingLR(o, T_max=max(1, steps)) for k, o in opts.items()}


def main_optimizers(method: MaskedModel, t: TrainConfig, steps: int, device: torch.device) -> Optimizers:
    """The main phase: SGD with momentum on the weights, Adam without weight decay on the scores,
    both with cosine decay over ``steps``."""
    opts: dict[str, torch.optim.Optimizer] = {}
    weights, scores = method.weight_parameters(), method.score_parameters()
    if weights:
        opts["weights"] = torch.optim.SGD(weights, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                                          fused=_fused(device))
    if scores:
        opts["scores"] = torch.optim.Adam(scores, lr=t.score_lr, weight_decay=0.0, fused=_fused(device))
    return _cosine(opts, steps)


def finetune_optimizers(method: MaskedModel, f: FinetuneConfig, steps: int, device: torch.device) -> Optimizers:
    """Finetuning under the fixed mask: SGD with momentum on the weights, cosine decay."""
    opts: dict[str, torch.optim.Optimizer] = {}
    weights = method.weight_parameters()
    if weights:
        opts["weights"] = torch.optim.SGD(weights, lr=f.lr, momentum=f.momentum, weight_decay=f.weight_decay,
                                          fused=_fused(device))
    return _cosine(opts, steps)


class Loop:
    """Training epochs and evaluations of ``model`` under ``method`` (see the module docstring).

    ``bf16``: the forward pass runs under bfloat16 autocast (matrix products and convolutions in
    bf16); the parameters, the scores, their gradients and the projection stay in float32.
    """

    def __init__(self, model: nn.Module, method: MaskedModel, *, device: torch.device, dist: DistContext,
                 bf16: bool, grad_clip: float, progress: bool) -> None:
        self.model, self.method, self.device, self.dist = model, method, device, dist
        self.bf16, self.grad_clip, self.progress = bf16, grad_clip, progress and dist.is_main
        self._ddp: DistributedDataParallel | None = None
        self._net: nn.Module = model  # what training forward passes go through

    # ------------------------------------------------------------------ wrapping
    def wrap(self, compile: bool) -> None:
        """Several processes: the same start everywhere and DDP around the module if anything in it
        trains; ``compile``: ``torch.compile`` around that."""
        if self.dist.enabled:
            self.dist.broadcast_(self.method.score_parameters())
            if any(p.requires_grad for p in self.model.parameters()):
                ids = [self.device.index] if self.device.type == "cuda" else None
                self._ddp = DistributedDataParallel(self.model, device_ids=ids)  # broadcasts rank 0's state
            else:  # supermask mode: nothing in the module trains
                self.dist.broadcast_([*self.model.parameters(), *self.model.buffers()])
        net: nn.Module = self._ddp if self._ddp is not None else self.model
        self._net = torch.compile(net) if compile else net

    def unwrap(self) -> None:
        self._ddp, self._net = None, self.model

    # ------------------------------------------------------------------ loops
    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def sum(self, *values: Tensor | float) -> list[float]:
        """The values summed over all processes (as they are with one)."""
        if not self.dist.enabled:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        return self.dist.all_reduce_sum_(t).tolist()

    def batches(self, loader: DataLoader, desc: str, max_batches: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        total = len(loader) if max_batches is None else min(max_batches, len(loader))
        bar = tqdm(loader, desc=desc, total=total, leave=False, dynamic_ncols=True,
                   disable=not self.progress, file=sys.stderr)
        try:
            for i, (x, y) in enumerate(bar):
                if i >= total:
                    break
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        finally:
            bar.close()

    def train_epoch(self, loader: DataLoader, optimizers: Mapping[str, torch.optim.Optimizer],
                    schedulers: Mapping[str, LRScheduler], samples: int, desc: str) -> dict[str, float]:
        """One epoch; returns the mean training loss and accuracy (percent, of the first pass)."""
        self.model.train()
        params = [p for opt in optimizers.values() for group in opt.param_groups for p in group["params"]]
        in_ddp = {id(p) for p in self._ddp.module.parameters()} if self._ddp is not None else set()
        outside_ddp = [p for p in params if id(p) not in in_ddp]  # e.g. the scores: averaged below
        total_loss = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        seen = 0
        for x, y in self.batches(loader, desc):
            for opt in optimizers.values():
                opt.zero_grad(set_to_none=True)
            passes = self.method.passes(samples)
            loss_sum: Tensor | None = None
            for i in range(passes):
                # DDP reduces the gradients in the backward of the last pass; earlier ones accumulate
                last = i == passes - 1
                with (nullcontext() if last or self._ddp is None else self._ddp.no_sync()), self._autocast():
                    out = self._net(x)
                    loss = F.cross_entropy(out.float(), y) / passes
                loss.backward()
                loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
                if i == 0:
                    correct += (out.detach().argmax(1) == y).sum()
            if self.dist.enabled:  # identical gradients on every rank, so identical steps
                self.dist.average_gradients(outside_ddp)
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
            for opt in optimizers.values():
                opt.step()
            self.method.step()
            for sched in schedulers.values():
                sched.step()
            assert loss_sum is not None
            total_loss += loss_sum.float() * y.numel()
            seen += y.numel()
        loss_total, correct_sum, seen_sum = self.sum(total_loss, correct, seen)
        if seen_sum == 0:
            raise UserError("the training set is empty")
        return {"train_loss": loss_total / seen_sum, "train_acc": 100.0 * correct_sum / seen_sum}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader, desc: str,
                 max_batches: int | None = None) -> tuple[float, float]:
        """(mean loss, accuracy in percent) in eval mode: hard masks, fixed or freshly sampled.
        With several processes each evaluates its shard and the sums are combined."""
        model.eval()
        total_loss = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        seen = 0
        for x, y in self.batches(loader, desc, max_batches):
            with self._autocast():
                out = model(x).float()
            total_loss += F.cross_entropy(out, y, reduction="sum")
            correct += (out.argmax(1) == y).sum()
            seen += y.numel()
        loss_sum, correct_sum, seen_sum = self.sum(total_loss, correct, seen)
        if seen_sum == 0:
            raise UserError("the test set is empty")
        return loss_sum / seen_sum, 100.0 * correct_sum / seen_sum
