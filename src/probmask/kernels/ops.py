"""The fused kernels registered as PyTorch operators: ``torch.ops.probmask.*``.

* ``relaxed_masked_weights(scores, weights, temperature, seed) -> weights * masks``: every
  layer's weight times a fresh relaxed mask of its slice of the flat ``scores``, with the noise
  of ``seed`` (a 0-d int64 tensor on the scores' device). Differentiable in the scores and the
  weights: its backward pass is the next operator, which regenerates the noise from the seed.
* ``relaxed_masked_weights_backward(scores, weights, grads, temperature, seed, need_scores,
  need_weights) -> (grad_scores, grad_weights)``: gradients not asked for come back empty.
* ``clamp_sums(scores, starts, sizes, thresholds) -> [m, 3] float64``: for each layer slice
  ``scores[start : start + size]`` and its float32 threshold ``c``: sum of clamp(s - c, 0, 1),
  #{s > c} and the raw sum of s (which shows NaN and inf that clamping hides). One evaluation of
  the projection's threshold search.

Each has a CPU implementation (C, :mod:`probmask.kernels.cpu`), a CUDA implementation (Triton,
:mod:`probmask.kernels.triton`, imported on first use) and a fake implementation, so that
``torch.compile(model, fullgraph=True)`` traces a model that uses them without a graph break.

:func:`fused_relaxed_masked_weights` is what ProbMask calls: the operator while ``torch.compile``
traces, and in eager mode an autograd function that calls the same implementations directly. The
dispatcher's Python layers cost about 0.5 ms per forward and backward pass on a 2-core VM
(``benchmarks/kernels.py``: LeNet-300-100's mask forward + backward 4.8 ms through the operator,
4.2 ms directly), a few percent of a small model's training step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from probmask.kernels import cpu
from probmask.numerics import limits

__all__ = ["clamp_sums", "fused_relaxed_masked_weights", "relaxed_masked_weights", "relaxed_masked_weights_backward"]

_LIMITS = limits(torch.float32)  # the operators compute in float32


def _triton():
    from probmask.kernels import triton

    return triton


# ------------------------------------------------------------------------------ forward
@torch.library.custom_op("probmask::relaxed_masked_weights", mutates_args=(), device_types="cpu")
def relaxed_masked_weights(scores: Tensor, weights: list[Tensor], temperature: float, seed: Tensor) -> list[Tensor]:
    return cpu.relaxed_forward(scores, weights, temperature, int(seed), _LIMITS)


@relaxed_masked_weights.register_kernel("cuda")
def _relaxed_cuda(scores: Tensor, weights: list[Tensor], temperature: float, seed: Tensor) -> list[Tensor]:
    return _triton().relaxed_forward(scores, weights, temperature, seed, _LIMITS)


@relaxed_masked_weights.register_fake
def _relaxed_fake(scores: Tensor, weights: list[Tensor], temperature: float, seed: Tensor) -> list[Tensor]:
    return [torch.empty_like(w) for w in weights]


# ------------------------------------------------------------------------------ backward
@torch.library.custom_op("probmask::relaxed_masked_weights_backward", mutates_args=(), device_types="cpu")
def relaxed_masked_weights_backward(
    scores: Tensor, weights: list[Tensor], grads: list[Tensor], temperature: float, seed: Tensor,
    need_scores: bool, need_weights: list[bool],
) -> tuple[Tensor, list[Tensor]]:
    grad_s, grad_ws = cpu.relaxed_backward(
        scores, weights, grads, temperature, int(seed), _LIMITS, need_scores, need_weights
    )
    return _filled(grad_s, scores), [_filled(g, w) for g, w in zip(grad_ws, weights)]


@relaxed_masked_weights_backward.register_kernel("cuda")
def _backward_cuda(
    scores: Tensor, weights: list[Tensor], grads: list[Tensor], temperature: float, seed: Tensor,
    need_scores: bool, need_weights: list[bool],
) -> tuple[Tensor, list[Tensor]]:
    grad_s, grad_ws = _triton().relaxed_backward(
        scores, weights, grads, temperature, seed, _LIMITS, need_scores, need_weights
    )
    return _filled(grad_s, scores), [_filled(g, w) for g, w in zip(grad_ws, weights)]


@relaxed_masked_weights_backward.register_fake
def _backward_fake(
    scores: Tensor, weights: list[Tensor], grads: list[Tensor], temperature: float, seed: Tensor,
    need_scores: bool, need_weights: list[bool],
) -> tuple[Tensor, list[Tensor]]:
    grad_s = torch.empty_like(scores) if need_scores else scores.new_empty(0)
    return grad_s, [torch.empty_like(w) if need else w.new_empty(0) for w, need in zip(weights, need_weights)]


def _filled(grad: Tensor | None, like: Tensor) -> Tensor:
    """An operator returns tensors only: an empty one stands for a gradient not asked for."""
    return like.new_empty(0) if grad is None else grad


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 - torch.library's signature
    scores, weights, temperature, seed = inputs
    ctx.save_for_backward(scores, seed, *weights)
    ctx.temperature = temperature
    ctx.need_scores = scores.requires_grad
    ctx.need_weights = [w.requires_grad for w in weights]


def _backward(ctx, grads: list[Tensor]):  # noqa: ANN001, ANN202 - torch.library's signature
    scores, seed, *weights = ctx.saved_tensors
    grad_s, grad_ws = relaxed_masked_weights_backward(
        scores, weights, list(grads), ctx.temperature, seed, ctx.need_scores, ctx.need_weights
    )
    grad_ws = [g if need else None for g, need in zip(grad_ws, ctx.need_weights)]
    return (grad_s if ctx.need_scores else None), grad_ws, None, None


relaxed_masked_weights.register_autograd(_backward, setup_context=_setup_context)


class _Eager(torch.autograd.Function):
    """The operator's forward and autograd formula in eager mode, without the dispatcher."""

    @staticmethod
    def forward(ctx, scores: Tensor, temperature: float, seed: Tensor, *weights: Tensor):  # type: ignore[override]
        impl, key = _implementation(scores, seed)
        ctx.save_for_backward(scores, *weights)
        ctx.temperature, ctx.key, ctx.impl = temperature, key, impl
        return tuple(impl.relaxed_forward(scores.detach(), [w.detach() for w in weights], temperature, key, _LIMITS))

    @staticmethod
    def backward(ctx, *grads: Tensor):  # type: ignore[override]
        scores, *weights = ctx.saved_tensors
        grad_s, grad_ws = ctx.impl.relaxed_backward(
            scores.detach(), [w.detach() for w in weights], grads, ctx.temperature, ctx.key, _LIMITS,
            ctx.needs_input_grad[0], ctx.needs_input_grad[3:],
        )
        return (grad_s, None, None, *grad_ws)


def _implementation(scores: Tensor, seed: Tensor):  # noqa: ANN202 - a module
    """The implementation for the scores' device and the noise key in the form it takes: the C
    kernels read a Python int (a free read on the CPU), Triton the tensor on the device."""
    if scores.device.type == "cpu":
        return cpu, int(seed)
    return _triton(), seed


def fused_relaxed_masked_weights(scores: Tensor, weights: list[Tensor], temperature: float,
                                 seed: Tensor) -> tuple[Tensor, ...]:
    """``probmask::relaxed_masked_weights`` with its gradients: the operator under
    ``torch.compile``, the same implementations called directly in eager mode."""
    if torch.compiler.is_compiling():
        return tuple(relaxed_masked_weights(scores, weights, temperature, seed))
    return _Eager.apply(scores, temperature, seed, *weights)


# ------------------------------------------------------------------------------ projection
@torch.library.custom_op("probmask::clamp_sums", mutates_args=(), device_types="cpu")
def clamp_sums(scores: Tensor, starts: list[int], sizes: list[int], thresholds: Tensor) -> Tensor:
    c = thresholds.tolist()
    rows = [
        cpu.clamp_sums(scores[a : a + n], c[0] if len(c) == 1 else c[i])
        for i, (a, n) in enumerate(zip(starts, sizes))
    ]
    return torch.tensor(rows, dtype=torch.float64).view(len(sizes), 3)


@clamp_sums.register_kernel("cuda")
def _clamp_sums_cuda(scores: Tensor, starts: list[int], sizes: list[int], thresholds: Tensor) -> Tensor:
    return _triton().clamp_sums(scores, starts, sizes, thresholds)


@clamp_sums.register_fake
def _clamp_sums_fake(scores: Tensor, starts: list[int], sizes: list[int], thresholds: Tensor) -> Tensor:
    return scores.new_empty((len(sizes), 3), dtype=torch.float64)
