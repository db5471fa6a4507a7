"""How a keep-probability becomes a mask on one weight tensor.

Three modes (:class:`MaskMode`): a relaxed, differentiable sample for training (binary concrete
/ Gumbel-sigmoid with one uniform draw per weight), a hard Bernoulli sample for evaluation, and a
fixed binary mask after :meth:`probmask.ProbMask.fix_mask`. The mask is attached to the user's
module with a ``torch.nn.utils.parametrize`` parametrization: no module is replaced.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from probmask.kernels import cpu as native
from probmask.numerics import EPS
from probmask.numerics import limits as _limits

if TYPE_CHECKING:  # pragma: no cover
    from probmask.sparsifier import ProbMask

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


class _NativeRelaxedMaskedWeights(torch.autograd.Function):
    """The same as :class:`_RelaxedMaskedWeights` with the compiled CPU kernels (see
    :mod:`probmask.kernels.cpu`): one pass per layer forward and one backward. Nothing full-size is
    saved for backward beyond the inputs: the backward pass regenerates the counter-based noise
    from the key and recomputes the logits."""

    @staticmethod
    def forward(ctx, scores: Tensor, temperature: float, seed: int, *weights: Tensor):  # type: ignore[override]
        limits = _limits(torch.float32)
        outs = native.relaxed_forward(scores.detach(), [w.detach() for w in weights], temperature, seed, limits)
        ctx.save_for_backward(scores, *weights)
        ctx.temperature, ctx.seed = temperature, seed
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads: Tensor):  # type: ignore[override]
        scores, *weights = ctx.saved_tensors
        grad_s, grad_ws = native.relaxed_backward(
            scores.detach(), [w.detach() for w in weights], grads, ctx.temperature, ctx.seed,
            _limits(torch.float32), ctx.needs_input_grad[0], ctx.needs_input_grad[3:],
        )
        return (grad_s, None, None, *grad_ws)


# torch.compile runs these two eagerly (a graph break): dynamo cannot trace the fused Function's
# in-place scratch use, and the noise must come from PyTorch's eager generator either way.
@torch.compiler.disable
def relaxed_masked_weights(
    scores: Tensor, weights: list[Tensor], temperature: float, work: Tensor | None = None
) -> tuple[Tensor, ...]:
    """``weights[l] * m_l`` for every layer, with fresh relaxed masks of the flat ``scores``.

    ``scores`` holds the layers' keep-probabilities back to back, in the order of ``weights``;
    the noise is one flat draw in that order (on the CPU, the same numbers as one draw per layer
    in turn). Float32 CPU tensors go through the compiled kernels when they are built (see
    :mod:`probmask.kernels.cpu`: the same maths with counter-based noise), the rest through PyTorch
    operations.
    ``work`` is an optional kept scratch tensor shaped like ``scores``, used only by the PyTorch
    way during the forward and the backward call (never across them).
    """
    if native.supports(scores, *weights):
        return _NativeRelaxedMaskedWeights.apply(scores, float(temperature), native.draw_seed(), *weights)
    work = torch.empty_like(scores.detach()) if work is None else work.detach()
    return _RelaxedMaskedWeights.apply(scores, float(temperature), work, *weights)


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


class MaskParametrization(nn.Module):
    """The parametrization registered on each prunable weight: ``weight -> weight * mask``.

    It holds no tensors of its own; it asks the owning :class:`ProbMask` for the mask of its
    layer, so that all scores live in one flat buffer. The owner is kept out of the module tree.
    """

    def __init__(self, owner: ProbMask, index: int) -> None:
        super().__init__()
        object.__setattr__(self, "_owner", owner)  # not a submodule, not in state_dict
        self.index = index

    def forward(self, weight: Tensor) -> Tensor:
        return self._owner._masked_weight(self.index, weight)

    def extra_repr(self) -> str:
        return f"layer={self.index}"
