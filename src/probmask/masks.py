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

if TYPE_CHECKING:  # pragma: no cover
    from probmask.sparsifier import ProbMask

__all__ = ["EPS", "MaskMode", "relaxed_masked_weight", "relaxed_mask"]

EPS = 1e-20  # guards the logs; logit(1) = log(1 + EPS) - log(EPS) ~ +46


class MaskMode(enum.Enum):
    """Which mask the forward pass uses."""

    RELAXED = "relaxed"  # training: m = sigmoid((logit s + logistic noise) * T), differentiable in s
    SAMPLED = "sampled"  # evaluation: m ~ Bernoulli(s), hard, no gradient to s
    FIXED = "fixed"  # after fix_mask: one fixed binary mask


def _logit_(x: Tensor) -> Tensor:
    """In place: log(x + EPS) - log(1 - x + EPS), finite for x in [0, 1]."""
    other = torch.sub(1.0, x).add_(EPS)  # (1 + EPS) would round to 1 before the subtraction
    return x.add_(EPS).log_().sub_(other.log_())


def _relaxed_logits(score: Tensor, temperature: float) -> Tensor:
    """z = (logit s + L) * T with L = log u - log(1 - u), u ~ U(0, 1): a new tensor."""
    z = _logit_(torch.rand_like(score))  # one uniform per weight: Logistic(0, 1) noise
    z.add_(_logit_(score.detach().clone()))
    return z.mul_(temperature)


def _dmask_dscore(z: Tensor, score: Tensor, temperature: float) -> Tensor:
    """dm/ds = T * sigmoid(z) * sigmoid(-z) * (1/(s+EPS) + 1/(1-s+EPS)), computed stably.

    ``m * (1 - m)`` would round to 0 once ``sigmoid(z)`` rounds to 1 (z > ~17 in float32); the
    form ``a * (1 - a)`` with ``a = sigmoid(-|z|)`` keeps the true, tiny value, so scores at
    exactly 1 still receive a gradient while the temperature is low.
    """
    a = z.abs().neg_().sigmoid_()
    a.mul_(torch.sub(1.0, a))
    inv = (score + EPS).mul_(torch.sub(1.0, score).add_(EPS)).reciprocal_()
    return a.mul_(inv).mul_(temperature)


class _RelaxedMaskedWeight(torch.autograd.Function):
    """weight * relaxed_mask(score), keeping only the logits z alive for the backward pass."""

    @staticmethod
    def forward(ctx, weight: Tensor, score: Tensor, temperature: float) -> Tensor:  # type: ignore[override]
        z = _relaxed_logits(score, temperature)
        ctx.save_for_backward(weight, score, z)
        ctx.temperature = temperature
        return torch.sigmoid(z).mul_(weight).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        weight, score, z = ctx.saved_tensors
        grad_w = grad_s = None
        if ctx.needs_input_grad[0]:
            grad_w = (torch.sigmoid(z).mul_(grad)).to(weight.dtype)
        if ctx.needs_input_grad[1]:
            grad_s = _dmask_dscore(z, score, ctx.temperature).mul_(grad).mul_(weight)
            grad_s = grad_s.to(score.dtype)
        return grad_w, grad_s, None


class _RelaxedMask(torch.autograd.Function):
    """The relaxed mask alone (for tests and analysis); same maths as the fused form."""

    @staticmethod
    def forward(ctx, score: Tensor, noise: Tensor, temperature: float) -> Tensor:  # type: ignore[override]
        z = _logit_(noise.detach().clone()).add_(_logit_(score.detach().clone())).mul_(temperature)
        ctx.save_for_backward(score, z)
        ctx.temperature = temperature
        return torch.sigmoid(z)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        score, z = ctx.saved_tensors
        return _dmask_dscore(z, score, ctx.temperature).mul_(grad), None, None


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
