"""N:M sparsity: N of every M consecutive input weights kept (2:4 is what sparse tensor cores run).

``ProbMask(model, granularity=NM(2, 4))`` learns such a mask. Each mask element is still one
weight, but the global budget is replaced by one budget per group of M consecutive weights along
the input dimension:

* the groups run along each row of ``weight.flatten(1)``: a Linear weight's input features, a
  convolution's ``in_channels / groups * kernel`` values of one output channel in PyTorch's order
  (the matrix an im2col convolution multiplies by). A layer whose row width is not a multiple of
  M is refused with its name (exclude it); so is a transposed convolution, whose weight stores
  input channels first, so that its rows are not input weights;
* while relaxed, every group holds its budget in expectation: after every step the scores are
  projected onto ``{0 <= s <= 1, sum of each group <= b}`` (:func:`project_groups_`, exact, all
  groups at once), where the schedule moves ``b = max(M * keep_ratio(t), N)`` from M to N;
* fixing keeps exactly N per group: ``fix_mask("topk")`` the N highest scores (:func:`topn_mask`),
  ``fix_mask("sample")`` Bernoulli samples repaired to N per group (:func:`sample_nm_mask`); and
  ``finalize`` bakes that in, so a finalized 2:4 Linear weight has the pattern
  :func:`torch.sparse.to_sparse_semi_structured` takes (:func:`check_semi_structured` checks it and
  the other requirements the CPU can check).

The sparsity is ``1 - N/M`` and the kept count exactly ``N`` per group; per-layer floors do not
apply (every row keeps N/M of its weights anyway). The relaxed masks are sampled as under the
global budget (with or without the fused kernels, :mod:`probmask.kernels`); the group projection is
PyTorch operations on every device, about 17-21 times one plain pass ``sum(clamp(s - v, 0, 1))``
over the scores for 2:4, 1:2 and 4:8 on one CPU thread (4M scores).

    pm = probmask.ProbMask(model, granularity=probmask.NM(2, 4))   # sparsity 0.5, implied
    ...                                   # the same training loop, pm.project() after every step
    pm.fix_mask(); model = pm.finalize()
    probmask.check_semi_structured(model.fc.weight.half())        # 2:4, shape and dtype
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from probmask.budget import FloorSpec
from probmask.granularity import Granularity, Layout

__all__ = [
    "NM", "SEMI_STRUCTURED_SHAPES", "check_semi_structured", "follows_nm", "parse_nm", "project_groups_", "sample_nm_mask",
    "semi_structured_problems", "topn_mask",
]


@dataclass(frozen=True)
class NM(Granularity):
    """N of every M consecutive input weights kept: ``NM(2, 4)``; ``name`` is ``"2:4"``."""

    name: str = field(default="", init=False, repr=False, compare=False)
    n: int = 2
    m: int = 4

    per_group_budget = True

    def __post_init__(self) -> None:
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (self.n, self.m))
        if not ints or not 0 < self.n < self.m:
            raise ValueError(f"N:M needs integers 0 < N < M (e.g. 2:4), got N={self.n!r}, M={self.m!r}")
        object.__setattr__(self, "name", f"{self.n}:{self.m}")

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def mask_shape(self, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(weight_shape)  # one mask element per weight

    def check(self, names: Sequence[str], weight_shapes: Sequence[tuple[int, ...]], modules: Sequence[Any]) -> None:
        transposed = [n for n, mod in zip(names, modules) if isinstance(mod, nn.modules.conv._ConvTransposeNd)]
        if transposed:
            raise ValueError(
                f"N:M {self.name} groups run along the input weights, which a transposed convolution does not "
                f"store along its rows: exclude them (exclude={transposed[:8]!r})"
            )
        widths = {n: _row_width(s) for n, s in zip(names, weight_shapes)}
        bad = {n: w for n, w in widths.items() if w % self.m}
        if bad:
            raise ValueError(
                f"N:M {self.name} needs every layer's input width to be a multiple of {self.m}; these are not "
                f"(name: width) {dict(list(bad.items())[:8])}: exclude them (exclude={list(bad)[:8]!r})"
            )

    def resolve_sparsity(self, sparsity: Any) -> float:
        if sparsity is not None and not math.isclose(float(sparsity), self.sparsity, abs_tol=1e-9):
            raise ValueError(
                f"N:M {self.name} removes exactly {self.sparsity:g} of the weights, not {sparsity!r}: "
                "leave sparsity out (sparsity=None)"
            )
        return self.sparsity

    def kept(self, sparsity: float, total: int) -> int:
        return total // self.m * self.n

    def floors(self, floor: FloorSpec, layout: Layout, kept: int, sparsity: float) -> list[int]:
        if floor not in ("auto", None, 0):
            raise ValueError(
                f"per-layer floors do not apply to N:M {self.name} (every row keeps {self.n} of every {self.m} "
                f"weights): leave floor at 'auto' or set None, got {floor!r}"
            )
        return [0] * len(layout.sizes)


def parse_nm(spec: NM | str | Sequence[int]) -> NM:
    """An :class:`NM` from ``"2:4"``, ``(2, 4)`` or an ``NM``; anything else is a ValueError."""
    if isinstance(spec, NM):
        return spec
    parts: Sequence[Any]
    if isinstance(spec, str):
        parts = spec.split(":")
        try:
            parts = [int(p.strip()) for p in parts]
        except ValueError:
            parts = []
    else:
        parts = list(spec) if isinstance(spec, (tuple, list)) else []
    if len(parts) != 2:
        raise ValueError(f"an N:M spec is 'N:M' or (N, M), e.g. '2:4'; got {spec!r}")
    return NM(parts[0], parts[1])


def _row_width(shape: tuple[int, ...]) -> int:
    """The length of one row of ``weight.flatten(1)`` (the whole tensor for fewer than 2 dimensions)."""
    return math.prod(shape[1:]) if len(shape) >= 2 else math.prod(shape)


def _groups(t: Tensor, m: int) -> Tensor:
    """``t`` viewed as one row per group of ``m`` consecutive elements."""
    if t.numel() % m:
        raise ValueError(f"{t.numel()} elements do not split into groups of {m}")
    if not t.is_contiguous():
        raise ValueError("the tensor must be contiguous (groups are consecutive elements)")
    return t.view(-1, m)


# Groups per chunk of the projection: on the CPU its dozen group-length temporaries stay in the cache.
_CHUNK_GROUPS = {"cpu": 1 << 16}
_DEFAULT_CHUNK_GROUPS = 1 << 22


@torch.no_grad()
def project_groups_(scores: Tensor, budget: float, m: int) -> Tensor:
    """Project, in place, every group of ``m`` consecutive scores onto ``{0 <= s <= 1, sum s <= budget}``.

    The Euclidean projection of one group is ``clamp(s - v, 0, 1)`` with ``v = 0`` where the clamped
    group already meets the budget, else the ``v > 0`` with ``f(v) = sum clamp(s - v, 0, 1) = budget``.
    ``f`` is non-increasing and piecewise linear with breakpoints ``s_i - 1`` and ``s_i``; it is
    evaluated at all 2M of them (and at 0), and ``v`` is the exact interpolation between the last
    one where ``f >= budget`` and the first where ``f < budget``: no breakpoint lies between them,
    so ``f`` is linear there. All groups at once: the work is laid out as one vector per position in
    the group (a loop over the M(M-1)/2 pairs of positions, never over groups), in chunks of groups.
    Returns ``scores``; NaN or inf in them is a ValueError.
    """
    budget = float(budget)
    if not budget > 0:
        raise ValueError(f"the per-group budget must be positive, got {budget}")
    groups = _groups(scores, m)
    if not bool(torch.isfinite(groups).all()):
        raise ValueError("NaN or inf in the scores: lower the learning rate or clip gradients")
    for chunk in groups.split(_CHUNK_GROUPS.get(scores.device.type, _DEFAULT_CHUNK_GROUPS)):
        _project_chunk_(chunk, budget)
    return scores


def _project_chunk_(g: Tensor, budget: float) -> None:
    m = g.shape[1]
    points = torch.empty(2 * m + 1, g.shape[0], dtype=g.dtype, device=g.device)  # breakpoints t, (2M+1, G)
    values = torch.zeros_like(points)  # f(t)
    cols = points[:m]  # position i of every group, contiguous: the breakpoints s_i
    for i in range(m):
        cols[i].copy_(g[:, i])
    torch.sub(cols, 1, out=points[m : 2 * m])
    points[2 * m] = 0
    torch.sum(cols.clamp(0, 1), 0, out=values[2 * m])
    over = values[2 * m] > budget  # groups where the budget binds
    if not bool(over.any()):
        g.clamp_(0, 1)
        return
    # f(s_k) = sum_i clamp(s_i - s_k, 0, 1) and f(s_k - 1) = M + sum_i clamp(s_i - s_k, -1, 0); the pair
    # (k, i) gives both terms of k and, negated, both of i (d = s_i - s_k changes sign).
    values[m : 2 * m] = m
    for k in range(m):
        for i in range(k):
            d = cols[i] - cols[k]
            up, down = d.clamp(0, 1), d.clamp_(-1, 0)
            values[k].add_(up)
            values[m + k].add_(down)
            values[i].sub_(down)
            values[m + i].sub_(up)
    # f's float evaluation is non-increasing in t too (rounding is monotone), so the t with f >= budget
    # all lie left of those with f < budget; f(0) > budget and f(max s) = 0 bound both sides. The
    # other side is pushed out of each max/min by adding +-BIG times a 0/1 indicator (no masks: faster).
    big = torch.finfo(g.dtype).max
    below = torch.lt(values, budget, out=torch.empty_like(values))  # 1.0 where f(t) < budget
    above = torch.sub(1, below)
    lo = torch.add(points, below, alpha=-big).amax(0)
    f_lo = torch.add(values, below, alpha=big).amin(0)
    hi = torch.add(points, above, alpha=big).amin(0)
    f_hi = torch.add(values, above, alpha=-big).amax(0)
    drop = f_lo - f_hi
    step = torch.where(drop > 0, (f_lo - budget) * (hi - lo) / drop.clamp_min(torch.finfo(g.dtype).tiny), 0.0)
    v = torch.where(over, torch.minimum(lo + step, hi).clamp_min_(0), 0.0)  # 0 where the budget does not bind
    for i in range(m):
        g[:, i].copy_(cols[i].sub_(v).clamp_(0, 1))


def topn_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """The ``n`` highest of every ``m`` consecutive scores, as a flat bool mask: exactly ``n`` per
    group (ties go to the lower index)."""
    groups = _groups(scores.detach(), m)
    order = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :n]
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=groups.device)
    return mask.scatter_(1, order, True).view(-1)


def sample_nm_mask(scores: Tensor, n: int, m: int, generator: torch.Generator | None = None) -> Tensor:
    """One Bernoulli(scores) sample repaired to exactly ``n`` per group: the sampled weights of a
    group first (the highest-scored of them where more than ``n`` were drawn), then the
    highest-scored of the rest."""
    probs = scores.detach().clamp(0.0, 1.0)
    draw = torch.rand(probs.shape, generator=generator, device=probs.device) < probs
    return topn_mask(draw.to(probs.dtype) * 2 + probs, n, m)


def follows_nm(weight: Tensor, n: int, m: int) -> bool:
    """Whether every group of ``m`` consecutive elements along the last dimension has at most ``n``
    non-zeros (a last dimension that is not a multiple of ``m`` does not)."""
    if weight.dim() == 0 or weight.shape[-1] % m:
        return False
    nonzero = (weight != 0).reshape(*weight.shape[:-1], -1, m).sum(-1)
    return bool((nonzero <= n).all())


# What torch.sparse.to_sparse_semi_structured requires of a tensor's dtype and shape, per backend:
# (minimum rows, minimum columns), each dimension at least and a multiple of it, as PyTorch's
# SparseSemiStructuredTensor{CUSPARSELT,CUTLASS}._DTYPE_SHAPE_CONSTRAINTS state them (sparse_min_rows,
# sparse_min_cols). cuSPARSELt is used unless CUTLASS is forced or cuSPARSELt is missing.
SEMI_STRUCTURED_SHAPES: dict[str, dict[torch.dtype, tuple[int, int]]] = {
    "cusparselt": {torch.float16: (16, 16), torch.bfloat16: (16, 16), torch.int8: (32, 32),
                   torch.float8_e4m3fn: (32, 32)},
    "cutlass": {torch.float16: (32, 64), torch.bfloat16: (32, 64), torch.int8: (16, 128), torch.float32: (32, 32)},
}


def semi_structured_problems(weight: Tensor, backend: str = "cusparselt") -> list[str]:
    """What keeps ``weight`` from being a semi-structured sparse tensor on ``backend``
    (``"cusparselt"``, PyTorch's default, or ``"cutlass"``); empty when nothing does.

    :func:`torch.sparse.to_sparse_semi_structured` takes a 2-D, contiguous CUDA tensor of a dtype
    its backend supports, both dimensions at least and a multiple of that dtype's minimum
    (:data:`SEMI_STRUCTURED_SHAPES`), with at most 2 non-zeros in every 4 consecutive elements of a
    row (CUTLASS float32: at most 1 in every 2, i.e. 1:2). It does not check that pattern itself:
    excess non-zeros are silently dropped. Everything but the device is checked here, so the check
    runs on the CPU; move the weight to CUDA (``weight.half().cuda()``) to convert it.
    """
    if backend not in SEMI_STRUCTURED_SHAPES:
        raise ValueError(f"backend must be one of {sorted(SEMI_STRUCTURED_SHAPES)}, got {backend!r}")
    problems = []
    if weight.dim() != 2:
        problems.append(f"it has {weight.dim()} dimensions, not 2 (a convolution's weight.flatten(1) has 2)")
    if not weight.is_contiguous():
        problems.append("it is not contiguous")
    shapes = SEMI_STRUCTURED_SHAPES[backend]
    if weight.dtype not in shapes:
        names = ", ".join(str(d).removeprefix("torch.") for d in shapes)
        problems.append(f"{backend} does not take {weight.dtype} (it takes {names})")
    elif weight.dim() == 2:
        rows, cols = shapes[weight.dtype]
        r, c = weight.shape
        if r < rows or r % rows or c < cols or c % cols:
            problems.append(f"its shape {tuple(weight.shape)} is not a multiple of ({rows}, {cols}) in both dimensions")
    n, m = (1, 2) if backend == "cutlass" and weight.dtype == torch.float32 else (2, 4)
    if weight.dim() >= 1 and weight.shape[-1] % m:
        problems.append(f"its rows ({weight.shape[-1]} wide) do not split into groups of {m}")
    elif weight.dim() >= 1 and not follows_nm(weight, n, m):
        problems.append(f"some group of {m} consecutive elements of a row has more than {n} non-zeros")
    return problems


def check_semi_structured(weight: Tensor, backend: str = "cusparselt") -> None:
    """Raise a ValueError listing :func:`semi_structured_problems` unless there are none."""
    problems = semi_structured_problems(weight, backend)
    if problems:
        raise ValueError("not a semi-structured sparse weight: " + "; ".join(problems))
