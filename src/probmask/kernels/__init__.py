"""Fused kernels for the two hot paths of a ProbMask step, as PyTorch operators, and the one place
that decides when they are used.

The relaxed mask's forward and backward pass and the projection's evaluation are registered
once as operators (``torch.ops.probmask.*``, see :mod:`probmask.kernels.ops`), each with a CPU
implementation in C (:mod:`probmask.kernels.cpu`) and a CUDA implementation in Triton
(:mod:`probmask.kernels.triton`), fake implementations for ``torch.compile`` and autograd. Both
draw the same counter-based noise (Philox-4x32-10 of the flat score index under a key drawn from
PyTorch's generator), which the backward pass regenerates instead of keeping anything
full-size. Where no implementation takes the tensors (float64 scores, channels-last weights, a
CPU build without a compiler, another device), the same maths runs as PyTorch operations.

:func:`settings` says what is asked for: ``fused`` (default on; ``PROBMASK_KERNELS=0`` in the
environment turns it off for the process) and the projection's ``search`` code path. Tests and
users change them for a block with :func:`use`. A :class:`probmask.ProbMask` reads them once,
when it is created.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, replace

import torch
from torch import Tensor

__all__ = ["ENV", "Settings", "available", "settings", "takes", "use"]

ENV = "PROBMASK_KERNELS"
_SEARCHES = ("auto", "host", "device")


@dataclass(frozen=True)
class Settings:
    """How probmask computes its hot paths.

    ``fused``: use the fused operators wherever an implementation takes the tensors.
    ``search``: the projection's threshold search: ``"host"`` (check convergence after every
    Newton step, reading numbers on the host: best on the CPU), ``"device"`` (blocks of steps in
    device tensors with one host synchronisation per block: best on accelerators) or ``"auto"``
    (host on the CPU, device elsewhere).
    """

    fused: bool = True
    search: str = "auto"

    def __post_init__(self) -> None:
        if self.search not in _SEARCHES:
            raise ValueError(f"search must be one of {', '.join(_SEARCHES)}, got {self.search!r}")


_SETTINGS: ContextVar[Settings] = ContextVar(
    "probmask_kernel_settings", default=Settings(fused=os.environ.get(ENV, "1") != "0"),  # noqa: B039 - frozen
)


def settings() -> Settings:
    """The settings in effect here."""
    return _SETTINGS.get()


@contextlib.contextmanager
def use(*, fused: bool | None = None, search: str | None = None) -> Iterator[Settings]:
    """Change the settings inside a ``with`` block (for this thread or task only)."""
    current = _SETTINGS.get()
    new = replace(
        current,
        fused=current.fused if fused is None else bool(fused),
        search=current.search if search is None else search,
    )
    token = _SETTINGS.set(new)
    try:
        yield new
    finally:
        _SETTINGS.reset(token)


@functools.cache
def available(device_type: str) -> bool:
    """Whether a fused implementation exists for tensors on ``device_type`` here: on the CPU the
    C extension was built, on CUDA Triton is installed."""
    if device_type == "cpu":
        from probmask.kernels import cpu

        return cpu.available()
    if device_type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return torch.cuda.is_available()
    return False


def takes(scores: Tensor, *weights: Tensor) -> bool:
    """Whether the fused operators take these tensors, given an implementation for their device:
    contiguous float32 scores, and contiguous weights of float32 (on CUDA also bfloat16 and
    float16) on the same device. Only tensor attributes are read (``torch.compile`` traces it)."""
    if scores.dtype != torch.float32 or not scores.is_contiguous():
        return False
    dtypes = (torch.float32,) if scores.device.type == "cpu" else (torch.float32, torch.bfloat16, torch.float16)
    return all(w.device == scores.device and w.dtype in dtypes and w.is_contiguous() for w in weights)
