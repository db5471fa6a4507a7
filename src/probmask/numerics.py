"""The numeric guards of the relaxed mask, shared by every implementation of it.

The PyTorch way (:mod:`probmask.masks`) and the fused kernels (:mod:`probmask.kernels`: C on the
CPU, Triton on CUDA) compute the same maths with the same guards, so that they agree to float32
rounding and never produce subnormal floats.
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = ["EPS", "limits"]

EPS = 1e-20  # guards the logs; logit(1) = log(1 + EPS) - log(EPS) ~ +46


@functools.cache
def limits(dtype: torch.dtype) -> tuple[float, float, float]:
    """(cap on |z|, smallest mask value kept, smallest a * (1 - a) kept) for ``dtype``.

    Subnormal floats are slow on CPUs (a matrix product with subnormal weights ran 20x slower
    here) and carry almost no precision, so the relaxation never produces them. |z| is capped at
    -log(tiny) (87 in float32), where sigmoid(-|z|) is still normal, and a score's gradient is
    set to 0 where the cap bit (its true value is below T * tiny / e, about 1e-18 of
    |w * grad|; the unguarded form computed it in subnormals or lost it to underflow). Mask
    values below tiny * 2**26 (2**-100 in float32) are set to 0, so that masked weights of
    magnitude >= 2**-26 stay normal; such a weight changes by less than 2**-100 of itself.
    """
    tiny = torch.finfo(dtype).tiny
    return float(math.floor(-math.log(tiny))), tiny * 2.0**26, 1.5 * tiny
