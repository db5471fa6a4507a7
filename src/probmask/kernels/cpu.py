"""The CPU implementation of the fused kernels: the optional C extension ``probmask.kernels._cpu``.

``src/probmask/kernels/_cpu.c`` fuses the hot loops of a training step on the CPU into single
passes over memory: the relaxed mask's forward pass (noise, logits, mask, times the weight), its
backward pass (both gradients, regenerating the noise instead of keeping the logits: no
full-size tensor is saved between the passes) and one evaluation of the projection's threshold
search. It is built by ``pip install`` when a C compiler and the Python headers are present;
:func:`available` tells whether it was. :mod:`probmask.kernels` decides when it is used.

The kernels take float32, contiguous CPU tensors (as NumPy views: they check dtype, layout and
lengths before touching memory). Their noise is Philox-4x32-10 of the flat score index under a
63-bit key drawn from PyTorch's generator once per forward pass, so ``torch.manual_seed`` still
makes runs repeatable, and the result does not depend on the number of threads. It is not
``torch.rand``'s: the same seed gives different (equally distributed) runs with and without the
kernels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

try:
    from probmask.kernels import _cpu as _kernels
except ImportError:  # pragma: no cover - depends on the build
    _kernels = None

__all__ = ["available", "clamp_sums", "philox", "relaxed_backward", "relaxed_forward", "uniform"]


def available() -> bool:
    """Whether the compiled kernels were built and import."""
    return _kernels is not None


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _kernels_module():
    if _kernels is None:
        raise RuntimeError(
            "probmask's compiled kernels are not built (no C compiler or Python headers at install "
            "time?): reinstall with them, or use the PyTorch path (probmask does so by itself)"
        )
    return _kernels


def _buffer(t: Tensor):
    """A zero-copy NumPy view of a CPU tensor, the form the kernels take: they check its dtype,
    layout and length themselves and raise TypeError or ValueError for anything else."""
    try:
        return t.numpy()
    except RuntimeError:  # it requires grad (checking that first would cost every call)
        return t.detach().numpy()


def uniform(n: int, seed: int, offset: int = 0) -> Tensor:
    """The kernels' uniforms in [0, 1) of flat indices ``offset .. offset + n`` under ``seed``."""
    out = torch.empty(n, dtype=torch.float32)
    _kernels_module().uniform(out.numpy(), offset, seed)
    return out


def philox(counter: Sequence[int], key: Sequence[int]) -> tuple[int, int, int, int]:
    """Philox-4x32-10 of one counter (four 32-bit words) under a key (two words)."""
    return _kernels_module().philox(tuple(counter), tuple(key))


def relaxed_forward(
    scores: Tensor, weights: Sequence[Tensor], temperature: float, seed: int, limits: tuple[float, float, float]
) -> list[Tensor]:
    """``w_l * m_l`` for every layer, m the relaxed masks of the flat ``scores`` (float32, CPU)."""
    k, threads = _kernels_module(), _threads()
    cap, mask_min, dmask_min = limits
    outs, offset, sb = [], 0, _buffer(scores)
    for w in weights:
        out = torch.empty_like(w)
        k.relaxed_forward(
            sb, _buffer(w), out.numpy(), offset, seed, temperature, cap, mask_min, dmask_min, threads
        )
        outs.append(out)
        offset += w.numel()
    return outs


def relaxed_backward(
    scores: Tensor,
    weights: Sequence[Tensor],
    grads: Sequence[Tensor],
    temperature: float,
    seed: int,
    limits: tuple[float, float, float],
    need_scores: bool,
    need_weights: Sequence[bool],
) -> tuple[Tensor | None, list[Tensor | None]]:
    """The flat score gradient (if asked) and each weight's gradient (where asked)."""
    k, threads = _kernels_module(), _threads()
    cap, mask_min, dmask_min = limits
    grad_s = torch.empty_like(scores) if need_scores else None
    gsb = None if grad_s is None else grad_s.numpy()
    grad_ws: list[Tensor | None] = []
    offset, sb = 0, _buffer(scores)
    for w, g, need_w in zip(weights, grads, need_weights):
        g = g.contiguous() if g.dtype == torch.float32 else g.float().contiguous()
        gw = torch.empty_like(w) if need_w else None
        if gw is not None or gsb is not None:
            k.relaxed_backward(
                sb, _buffer(w), _buffer(g), None if gw is None else gw.numpy(), gsb,
                offset, seed, temperature, cap, mask_min, dmask_min, threads,
            )
        grad_ws.append(gw)
        offset += w.numel()
    return grad_s, grad_ws


def clamp_sums(src: Tensor, c: float) -> tuple[float, float, float]:
    """(sum clamp(s - c, 0, 1), #{s > c}, sum s) of a float32 CPU tensor, in one pass.

    ``s - c`` is rounded to float32 as in PyTorch; the sums add float32 sums of 128 elements in
    float64, about as accurate as PyTorch's float32 sum (the projection's stopping rule relies
    on that).
    """
    return _kernels_module().clamp_sums(_buffer(src), c, _threads())
