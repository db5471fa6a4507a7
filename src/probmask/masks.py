"""How a keep-probability becomes a mask on one weight tensor.

Three modes (:class:`MaskMode`): a relaxed, differentiable sample for training (binary concrete
/ Gumbel-sigmoid with one uniform draw per weight), a hard Bernoulli sample for evaluation, and a
fixed binary mask after :meth:`probmask.ProbMask.fix_mask`. The relaxed sample runs as the fused
operator of :mod:`probmask.kernels` where one takes the tensors, and otherwise as the PyTorch
operations below (the same maths, with ``torch.rand`` noise).
"""

from __future__ import annotations

import enum

import torch
from torch import Tensor

from probmask import kernels
from probmask.kernels import ops
from probmask.numerics import EPS
from probmask.numerics import limits as _limits

__all__ = ["EPS", "MaskMode", "relaxed_mask", "relaxed_masked_weight", "relaxed_masked_weights"]


class MaskMode(enum.Enum):
    """Which mask the forward pass uses."""

    RELAXED = "relaxed"  # training: m = sigmoid((logit s + logistic noise) * T), differentiable in s
    SAMPLED = "sampled"  # evaluation: m ~ Bernoulli(s), hard, no gradient to s
    FIXED = "fixed"  # after fix_mask: one fixed binary mask


def _dlogit_dscore(score: Tensor, work: Tensor) -> Tensor:
    """``work`` <- 1 / ((s+e)(1-s+e)) = d(logit s)/ds of detached scores (up to 1 + 2e, which
    rounds to 1), computed as 1 / (s(1-s) + e): the same float, as s + e rounds to s wherever
    s(1-s) outweighs e."""
    return torch.sub(1.0, score, out=work).mul_(score).add_(EPS).reciprocal_()


def _mask_(z: Tensor) -> Tensor:
    """m = sigmoid(z) with tiny values flushed to 0: a new tensor."""
    return torch.nn.functional.threshold_(torch.sigmoid(z), _limits(z.dtype)[1], 0.0)


def _dmask_dlogit(z: Tensor) -> Tensor:
    """dm/dz / T = sigmoid(z) * sigmoid(-z) = a * (1 - a), a = sigmoid(-|z|): a new tensor.

    ``m * (1 - m)`` would round to 0 once sigmoid(z) rounds to 1 (z > ~17 in float32); this form
    keeps the true, tiny value, so scores at exactly 1 still receive a gradient while the
    temperature is low.
    """
    a = z.abs().neg_().sigmoid_()
    a.addcmul_(a, a, value=-1.0)
    return torch.nn.functional.threshold_(a, _limits(z.dtype)[2], 0.0)


def _logits_from_odds_(odds: Tensor, score: Tensor, temperature: float, work: Tensor) -> Tensor:
    """In place: ``odds`` (the noise odds (u+e) / (1-u+e)) becomes the capped logits
    z = T * (logit u + logit s) = T * log(odds * (s+e) / (1-s+e)), logit s = log(s+e) - log(1-s+e).

    One logarithm of the product instead of one per factor: the logarithms are the costly part of
    sampling a mask, and the product is also the more accurate form (a float32 log near -46 is
    only good to 4e-6). The product lies in [e^2, 2e27]: it neither overflows nor underflows to 0
    (e^2 = 1e-40, reached only for u = 0 and s = 0, is a float32 subnormal, beyond the cap of
    :func:`_limits` once T >= 1). ``work`` is scratch.
    """
    odds.mul_(torch.add(score, EPS, out=work))
    odds.div_(torch.sub(1.0, score, out=work).add_(EPS))
    cap = _limits(odds.dtype)[0]
    return odds.log_().mul_(temperature).clamp_(-cap, cap)


def _relaxed_logits(noise: Tensor, score: Tensor, temperature: float, work: Tensor) -> Tensor:
    """z = (logit u + logit s) * T, capped (see :func:`_limits`), in ``noise``'s storage.

    ``noise`` holds u in [0, 1) on the float grid of ``torch.rand``, where u + e = max(u, e) and
    1 - u + e = 1 - u exactly. ``work`` is scratch shaped like the scores.
    """
    noise.clamp_min_(EPS)
    return _logits_from_odds_(noise.div_(torch.sub(1.0, noise, out=work)), score, temperature, work)


class _RelaxedMaskedWeight(torch.autograd.Function):
    """weight * relaxed_mask(score), keeping only the logits z (one tensor) for backward."""

    @staticmethod
    def forward(ctx, weight: Tensor, score: Tensor, temperature: float) -> Tensor:  # type: ignore[override]
        s = score.detach()
        # one uniform per weight: Logistic(0, 1) noise
        z = _relaxed_logits(torch.rand_like(score), s, temperature, torch.empty_like(s))
        ctx.save_for_backward(weight, score, z)
        ctx.temperature = temperature
        return _mask_(z).mul_(weight).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        weight, score, z = ctx.saved_tensors
        grad_w = grad_s = None
        if ctx.needs_input_grad[0]:
            grad_w = _mask_(z).mul_(grad).to(weight.dtype)
        if ctx.needs_input_grad[1]:
            s = score.detach()
            grad_s = _dmask_dlogit(z).mul_(_dlogit_dscore(s, torch.empty_like(s))).mul_(ctx.temperature)
            grad_s = grad_s.mul_(grad).mul_(weight).to(score.dtype)
        return grad_w, grad_s, None


class _RelaxedMaskedWeights(torch.autograd.Function):
    """Every layer's ``weight * relaxed_mask(score)`` at once, from the flat score buffer.

    The same maths as :class:`_RelaxedMaskedWeight`, but the noise, the logits and the score
    gradient are computed in a few passes over the flat buffer instead of a dozen small
    operations per layer, the score gradient is written straight into one flat tensor
    (per-layer score views would make autograd allocate and concatenate one), and the score-only
    factors go through a kept scratch buffer instead of fresh full-size temporaries. Saved for
    backward: the flat logits z (one float per weight), as the per-layer form saves its z.
    """

    @staticmethod
    def forward(ctx, scores: Tensor, temperature: float, work: Tensor, *weights: Tensor):  # type: ignore[override]
        s = scores.detach()
        z = _relaxed_logits(torch.rand_like(scores), s, temperature, work)  # one uniform per weight
        sizes = [w.numel() for w in weights]
        # per layer, so that the only new tensors are the outputs
        outs = tuple(_mask_(zl.view(w.shape)).mul_(w).to(w.dtype) for zl, w in zip(z.split(sizes), weights))
        ctx.save_for_backward(scores, z, *weights)
        ctx.temperature, ctx.sizes, ctx.work = temperature, sizes, work
        return outs

    @staticmethod
    def backward(ctx, *grads: Tensor):  # type: ignore[override]
        scores, z, *weights = ctx.saved_tensors
        sizes = ctx.sizes
        grad_s = None
        grad_ws: list[Tensor | None] = [None] * len(weights)
        for i, (zl, w, g) in enumerate(zip(z.split(sizes), weights, grads)):
            if ctx.needs_input_grad[3 + i]:
                grad_ws[i] = _mask_(zl.view(w.shape)).mul_(g).to(w.dtype)
        if ctx.needs_input_grad[0]:
            inv_den = _dlogit_dscore(scores.detach(), ctx.work)
            grad_s = _dmask_dlogit(z).mul_(inv_den).mul_(ctx.temperature)
            for d, w, g in zip(grad_s.split(sizes), weights, grads):
                d.view(w.shape).mul_(g).mul_(w)
            grad_s = grad_s.to(scores.dtype)
        return (grad_s, None, None, *grad_ws)


def relaxed_masked_weights(
    scores: Tensor, weights: list[Tensor], temperature: float, work: Tensor | None = None, *,
    fused: bool | None = None,
) -> tuple[Tensor, ...]:
    """``weights[l] * m_l`` for every layer, with fresh relaxed masks of the flat ``scores``.

    ``scores`` holds the layers' keep-probabilities back to back, in the order of ``weights``.
    With ``fused`` (default: :func:`probmask.kernels.settings`) and tensors the fused operators take
    (see :mod:`probmask.kernels`), this is the operator ``probmask::relaxed_masked_weights``
    (:func:`probmask.kernels.ops.fused_relaxed_masked_weights`) with counter-based noise under a key drawn from
    PyTorch's generator; otherwise PyTorch operations draw one flat ``torch.rand`` in layer order
    (on the CPU, the same numbers as one draw per layer in turn). Both ways compute the same maths.
    ``work`` is an optional kept scratch tensor shaped like ``scores`` for the PyTorch way, used
    only during the forward and the backward call (never across them).
    """
    fused = kernels.settings().fused if fused is None else fused
    fused = fused and kernels.available(scores.device.type) and kernels.takes(scores, *weights)
    return sample_masked_weights(scores, weights, temperature, work, fused=fused)


def sample_masked_weights(
    scores: Tensor, weights: list[Tensor], temperature: float, work: Tensor | None, *, fused: bool
) -> tuple[Tensor, ...]:
    """:func:`relaxed_masked_weights` where the caller decided the way: ``fused`` only if
    :func:`probmask.kernels.available` and :func:`probmask.kernels.takes` said so. The fused way
    draws a fresh 63-bit noise key from the generator of the scores' device."""
    if fused:
        seed = torch.randint(0, 2**63 - 1, (), dtype=torch.int64, device=scores.device)
        return ops.fused_relaxed_masked_weights(scores, list(weights), float(temperature), seed)
    return _torch_relaxed(scores, weights, float(temperature), work)


# torch.compile runs the PyTorch way eagerly (a graph break): dynamo cannot trace its in-place use
# of the kept scratch buffer. The fused operators trace.
@torch.compiler.disable
def _torch_relaxed(scores: Tensor, weights: list[Tensor], temperature: float, work: Tensor | None) -> tuple[Tensor, ...]:
    work = torch.empty_like(scores.detach()) if work is None else work.detach()
    return _RelaxedMaskedWeights.apply(scores, temperature, work, *weights)


class _RelaxedMask(torch.autograd.Function):
    """The relaxed mask alone (for tests and analysis); same maths as the fused form."""

    @staticmethod
    def forward(ctx, score: Tensor, noise: Tensor, temperature: float) -> Tensor:  # type: ignore[override]
        u = noise.detach()
        odds = torch.add(u, EPS).div_(torch.sub(1.0, u).add_(EPS))  # any u in [0, 1]
        s = score.detach()
        z = _logits_from_odds_(odds, s, temperature, torch.empty_like(s))
        ctx.save_for_backward(score, z)
        ctx.temperature = temperature
        return _mask_(z)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        score, z = ctx.saved_tensors
        s = score.detach()
        dz = _dmask_dlogit(z).mul_(_dlogit_dscore(s, torch.empty_like(s))).mul_(ctx.temperature)
        return dz.mul_(grad), None, None


@torch.compiler.disable
def relaxed_masked_weight(weight: Tensor, score: Tensor, temperature: float) -> Tensor:
    """``weight * m`` with ``m`` a fresh relaxed mask sample of keep-probabilities ``score``."""
    return _RelaxedMaskedWeight.apply(weight, score, float(temperature))


def relaxed_mask(score: Tensor, noise: Tensor, temperature: float) -> Tensor:
    """The relaxed mask for given uniform ``noise`` in [0, 1): differentiable in ``score``."""
    return _RelaxedMask.apply(score, noise, float(temperature))
