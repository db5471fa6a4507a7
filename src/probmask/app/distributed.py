"""Several training processes (``torchrun``) as the runner sees them: one small context object.

A :class:`DistContext` says which process this is (``rank`` of ``world_size``) and offers the few
collective operations the runner needs. The single-process context (the default) turns every one
of them into a no-op, so the runner has one code path. Nothing here is global: the CLI builds the
context from torchrun's environment variables with :meth:`DistContext.from_env` and passes it on.

What the runner does with it (see :mod:`probmask.app.training`): the model's trainable parameters are
wrapped in ``DistributedDataParallel``; gradients of parameters outside the module (a method's
scores) are averaged here with :meth:`DistContext.average_gradients`, so that every rank takes the
identical optimizer step and the projection sees identical scores; metrics are summed across
ranks; decisions (the fixed mask, a resumed checkpoint) are made on rank 0 and broadcast; only
rank 0 writes files.

Sharded training (FSDP) is not supported; DDP is. ProbMask samples every layer's mask in one flat
pass when the model's forward starts, which needs every prunable weight whole at that moment, and
its projection and mask fixing work on all scores together; sharding would need mask sampling per
sharded unit, the projection's per-layer sums all-reduced in every step of its search and a
distributed top-k.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Sampler

from probmask.app.errors import UserError

__all__ = ["DistContext", "ShardSampler"]

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """This process's place among ``world_size`` training processes (one per device).

    ``owns_group``: :meth:`close` destroys the default process group (it was created by
    :meth:`from_env`).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    # ------------------------------------------------------------------ set-up
    @classmethod
    def from_env(cls, timeout_s: float = 1800.0) -> DistContext:
        """The context torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ...).

        Without ``WORLD_SIZE`` > 1 this is the single-process context. Otherwise the default
        process group is created if there is none: NCCL for CUDA tensors and gloo for CPU tensors
        when CUDA is present, gloo alone otherwise.
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not dist.is_available():
            raise UserError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
        owns = False
        if not dist.is_initialized():
            backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
            owns = True
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)

    def close(self) -> None:
        """Destroy the process group if :meth:`from_env` created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    @property
    def enabled(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and writes files."""
        return self.rank == 0

    # ------------------------------------------------------------------ collectives
    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum_(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over all ranks, in place; returns it."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def average_gradients(self, params: Sequence[Tensor]) -> None:
        """Replace every ``p.grad`` by its mean over all ranks, with one all-reduce per dtype.

        A missing gradient counts as zeros (and becomes a zero tensor), so all ranks always take
        part in the same reductions. The sum is divided by the world size on every rank: the
        results are bit-identical across ranks.
        """
        if not self.enabled or not params:
            return
        groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            groups.setdefault((p.grad.dtype, p.grad.device), []).append(p)
        for group in groups.values():
            grads = [p.grad for p in group]
            flat = torch.cat([g.reshape(-1) for g in grads])  # type: ignore[union-attr]
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat.div_(self.world_size)
            for g, part in zip(grads, flat.split([g.numel() for g in grads])):  # type: ignore[union-attr]
                g.copy_(part.view_as(g))  # type: ignore[union-attr]

    def broadcast_(self, tensors: Sequence[Tensor]) -> None:
        """Overwrite ``tensors`` on every rank with rank 0's values."""
        if self.enabled:
            with torch.no_grad():
                for t in tensors:
                    dist.broadcast(t.data, src=0)

    def broadcast_object(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (pickled; keep tensors in it on the CPU)."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]  # type: ignore[return-value]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and hand its result to every rank.

        An exception on rank 0 is raised on every rank (a :class:`UserError` with its message,
        anything else as a ``RuntimeError`` naming it), so no rank waits forever for the others.
        """
        if not self.enabled:
            return fn()
        outcome: tuple[str, Any] = ("ok", None)
        error: BaseException | None = None
        if self.is_main:
            try:
                outcome = ("ok", fn())
            except UserError as err:
                outcome, error = ("user", str(err)), err
            except Exception as err:  # reported on the other ranks, re-raised here as it is
                outcome, error = ("fail", f"{type(err).__name__}: {err}"), err
        kind, value = self.broadcast_object(outcome)
        if error is not None:
            raise error
        if kind == "user":
            raise _RankZeroUserError(value)
        if kind == "fail":
            raise RuntimeError(f"rank 0 failed: {value}")
        return value

    def assert_same(self, tensors: Sequence[Tensor], what: str) -> None:
        """Raise unless ``tensors`` hold the same bits on every rank (one small all-gather).

        Compares the sum of the bit patterns (as integers), so a difference in the last bit of a
        single element is caught.
        """
        if not self.enabled:
            return
        sums = []
        for t in tensors:
            t = t.detach().contiguous().reshape(-1)
            if t.dtype == torch.bool:
                t = t.to(torch.uint8)
            bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
            sums.append(int(t.view(bits).sum(dtype=torch.int64)))
        seen = self.all_gather_object(sums)
        if any(s != seen[0] for s in seen[1:]):
            raise RuntimeError(f"{what} differ across ranks (checksums {seen}): the ranks diverged")


class _RankZeroUserError(UserError):
    """Rank 0's :class:`UserError` raised on another rank; rank 0 reports it (``quiet``)."""

    quiet = True


class ShardSampler(Sampler[int]):
    """Every ``world_size``-th index from ``rank`` on, in order: an exact partition of the data
    set across ranks (no padding, no repeats), for evaluation with summed counts."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, length, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
