"""The fused kernels on CUDA, in Triton: the relaxed mask's forward and backward pass and one
evaluation of the projection's threshold search.

The same three kernels as the C ones of :mod:`probmask.kernels.cpu` (``_cpu.c``), with the same
maths, guards (:mod:`probmask.numerics`) and noise: the uniform of flat score index ``i`` is word
``i & 3`` of Philox-4x32-10 of the counter ``(i >> 2, 0, 0)`` under the 64-bit seed as key,
``(word >> 8) * 2**-24``, so for the same seed both devices draw the same uniforms bit for bit,
and the backward pass regenerates them (and the logits) instead of keeping anything full-size.
The seed is a 0-d int64 tensor that the kernels read on the device: no host synchronisation.

* :func:`relaxed_forward`: ``w * m`` per layer, one launch per layer; each program takes 4-aligned
  runs of flat indices, so that one Philox block gives the noise of four elements.
* :func:`relaxed_backward`: the weight gradient ``m * g`` and the flat score gradient.
* :func:`clamp_sums`: ``sum clamp(s - c, 0, 1)``, ``#{s > c}`` and ``sum s`` of several layer slices
  in one launch over all their blocks (a block -> layer table built once per layout), each block
  summed in float64 into its own slot, then a second launch, one program per layer, adds its
  blocks' sums in a fixed order: no atomics, the same bits on every run.

Divisions round to nearest (``div_rn``), the kernels' multiplications and additions are not
fused into FMAs (``enable_fp_fusion=False``: the operations in the order written, as in the C
code) and ``log``/``exp`` are libdevice's, so the results agree with the C kernels and PyTorch to
float32 rounding (the last bits of log and exp differ between libraries). With
``TRITON_INTERPRET=1`` in the environment when this module is imported, Triton's interpreter runs
the kernels on CPU tensors (with NumPy's ``log``/``exp``): this is how the tests run without a GPU.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice

from probmask.numerics import EPS

__all__ = ["INTERPRET", "clamp_sums", "philox", "relaxed_backward", "relaxed_forward", "uniform"]

INTERPRET: bool = bool(triton.knobs.runtime.interpret)
"""Whether the kernels were defined for Triton's interpreter (``TRITON_INTERPRET=1`` at import)."""

_ACCURATE = not INTERPRET  # libdevice's log/exp on the device (the interpreter has no libdevice)

_M0 = tl.constexpr(0xD2511F53)
_M1 = tl.constexpr(0xCD9E8D57)
_W0 = tl.constexpr(0x9E3779B9)
_W1 = tl.constexpr(0xBB67AE85)
_EPS = tl.constexpr(EPS)
_TWO_M24 = tl.constexpr(2.0**-24)

_ROWS = 256  # Philox blocks per program of the mask kernels: 1024 elements
_UNIFORM_ROWS = 1024  # and of uniform(), which only tests use (fewer programs: faster in the interpreter)
_SUM_BLOCK = 2048  # elements per block of clamp_sums
_SUM_CHUNK = 256  # block sums added per step of the reduction
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ------------------------------------------------------------------------------ device code
@triton.jit
def _philox(c0, c1, c2, c3, k0, k1):
    """Philox-4x32-10 of the counters (c0, c1, c2, c3) under the key (k0, k1): uint32 tensors."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, _M0)
        lo0 = c0 * _M0
        hi1 = tl.umulhi(c2, _M1)
        lo1 = c2 * _M1
        c0 = hi1 ^ c1 ^ k0
        c2 = hi0 ^ c3 ^ k1
        c1 = lo1
        c3 = lo0
        k0 = k0 + _W0
        k1 = k1 + _W1
    return c0, c1, c2, c3


@triton.jit
def _uniforms(seed_ptr, first_block, ROWS: tl.constexpr):
    """The uniforms of the flat indices 4 * first_block ... + 4 * ROWS, as [ROWS, 4] tiles (row j
    is Philox block first_block + j), and those flat indices (int64)."""
    seed = tl.load(seed_ptr).to(tl.int64)
    k0 = seed.to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    block = first_block + tl.arange(0, ROWS).to(tl.int64)[:, None]
    zero = tl.zeros(block.shape, tl.uint32)
    x0, x1, x2, x3 = _philox(block.to(tl.uint32), (block >> 32).to(tl.uint32), zero, zero, k0, k1)
    col = tl.arange(0, 4)[None, :]
    word = tl.where(col == 0, x0, tl.where(col == 1, x1, tl.where(col == 2, x2, x3)))
    u = (word >> 8).to(tl.float32) * _TWO_M24
    return u, block * 4 + col


@triton.jit
def _relax(u, s, temperature, cap, mask_min, ACCURATE: tl.constexpr):
    """a = sigmoid(-|z|) and the mask m = sigmoid(z) (0 below mask_min) of the capped logits
    z = T * log(max(u, e) (s + e) / ((1 - u) (1 - s + e))): probmask.masks' maths, in float32."""
    ui = tl.where(u > _EPS, u, _EPS)
    num = ui * (s + _EPS)
    den = (1.0 - ui) * ((1.0 - s) + _EPS)
    q = tl.math.div_rn(num, den)
    if ACCURATE:
        lq = libdevice.log(q)
    else:
        lq = tl.log(q)
    z = temperature * lq
    z = tl.where(z > cap, cap, z)
    z = tl.where(z < -cap, -cap, z)
    if ACCURATE:
        e = libdevice.exp(-tl.abs(z))
    else:
        e = tl.exp(-tl.abs(z))
    r = tl.math.div_rn(tl.full(e.shape, 1.0, tl.float32), 1.0 + e)
    a = e * r
    m = tl.where(z >= 0.0, r, a)
    m = tl.where(m < mask_min, 0.0, m)
    return a, m


@triton.jit
def _bf16(x):
    """float32 -> bfloat16 rounded to nearest even (NaN stays NaN), in integer operations, so that
    the interpreter (which truncates) rounds as the device and PyTorch do."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + (0x7FFF + ((bits >> 16) & 1))
    half = tl.where(x != x, 0x7FC0, bits >> 16)
    return half.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _relaxed_kernel(
    s_ptr, w_ptr, g_ptr, out_ptr, gw_ptr, gs_ptr, seed_ptr, n, offset, temperature, cap, mask_min, dmask_min,
    FORWARD: tl.constexpr, NEED_W: tl.constexpr, NEED_S: tl.constexpr, OUT_BF16: tl.constexpr,
    ROWS: tl.constexpr, ACCURATE: tl.constexpr,
):
    """One layer: its scores are s_ptr[offset : offset + n] (flat indices), its weight, output
    gradient and outputs w_ptr[0 : n] etc. Forward: out = w * m. Backward: gw = m * g (if NEED_W)
    and gs[offset + i] = a (1 - a) / (s (1 - s) + e) * T * g * w (if NEED_S)."""
    pid = tl.program_id(0).to(tl.int64)
    u, flat = _uniforms(seed_ptr, (offset >> 2) + pid * ROWS, ROWS)
    i = flat - offset
    valid = (i >= 0) & (i < n)
    s = tl.load(s_ptr + flat, mask=valid, other=0.5)
    a, m = _relax(u, s, temperature, cap, mask_min, ACCURATE)
    w = tl.load(w_ptr + i, mask=valid, other=0.0).to(tl.float32)
    if FORWARD:
        y = w * m
        if OUT_BF16:
            tl.store(out_ptr + i, _bf16(y), mask=valid)
        else:
            tl.store(out_ptr + i, y.to(out_ptr.dtype.element_ty), mask=valid)
    else:
        g = tl.load(g_ptr + i, mask=valid, other=0.0).to(tl.float32)
        if NEED_W:
            gw = m * g
            if OUT_BF16:
                tl.store(gw_ptr + i, _bf16(gw), mask=valid)
            else:
                tl.store(gw_ptr + i, gw.to(gw_ptr.dtype.element_ty), mask=valid)
        if NEED_S:
            d = a - a * a
            d = tl.where(d < dmask_min, 0.0, d)
            dlogit = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), (1.0 - s) * s + _EPS)
            tl.store(gs_ptr + flat, d * dlogit * temperature * g * w, mask=valid)


@triton.jit
def _uniform_kernel(out_ptr, seed_ptr, n, offset, ROWS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    u, flat = _uniforms(seed_ptr, (offset >> 2) + pid * ROWS, ROWS)
    i = flat - offset
    tl.store(out_ptr + i, u, mask=(i >= 0) & (i < n))


@triton.jit
def _philox_kernel(io_ptr):
    """io[0:4] the counter and io[4:6] the key (uint32 words in int64) -> io[0:4] the output words."""
    c0 = tl.load(io_ptr).to(tl.uint32)
    c1 = tl.load(io_ptr + 1).to(tl.uint32)
    c2 = tl.load(io_ptr + 2).to(tl.uint32)
    c3 = tl.load(io_ptr + 3).to(tl.uint32)
    c0, c1, c2, c3 = _philox(c0, c1, c2, c3, tl.load(io_ptr + 4).to(tl.uint32), tl.load(io_ptr + 5).to(tl.uint32))
    tl.store(io_ptr, c0.to(tl.int64))
    tl.store(io_ptr + 1, c1.to(tl.int64))
    tl.store(io_ptr + 2, c2.to(tl.int64))
    tl.store(io_ptr + 3, c3.to(tl.int64))


@triton.jit
def _sums_kernel(s_ptr, thr_ptr, thr_stride, block_layer_ptr, meta_ptr, n_layers, part_ptr, n_blocks,
                 BLOCK: tl.constexpr):
    """Block b of its layer: part[j * n_blocks + b] = (sum clamp(s - c, 0, 1), #{s > c}, sum s)[j]."""
    b = tl.program_id(0)
    layer = tl.load(block_layer_ptr + b)
    start = tl.load(meta_ptr + layer)
    size = tl.load(meta_ptr + n_layers + layer)
    first = tl.load(meta_ptr + 2 * n_layers + layer)
    idx = (b - first) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    valid = idx < size
    s = tl.load(s_ptr + start + idx, mask=valid, other=0.0)
    c = tl.load(thr_ptr + layer * thr_stride)
    x = s - c  # rounded to float32, as PyTorch computes it
    x = tl.where(x < 0.0, 0.0, x)
    x = tl.where(x > 1.0, 1.0, x)  # NaN stays NaN, as in torch.clamp
    x = tl.where(valid, x, 0.0)
    f = tl.sum(x.to(tl.float64), axis=0)
    count = tl.sum((x > 0.0).to(tl.int32), axis=0)
    raw = tl.sum(s.to(tl.float64), axis=0)
    tl.store(part_ptr + b, f)
    tl.store(part_ptr + n_blocks + b, count.to(tl.float64))
    tl.store(part_ptr + 2 * n_blocks + b, raw)


@triton.jit
def _sums_reduce_kernel(part_ptr, n_blocks, meta_ptr, n_layers, out_ptr, CHUNK: tl.constexpr):
    """One layer: out[layer] = the sums of its blocks, added in the same order on every run."""
    layer = tl.program_id(0)
    first = tl.load(meta_ptr + 2 * n_layers + layer)
    count = tl.load(meta_ptr + 3 * n_layers + layer)
    acc_f = tl.zeros([CHUNK], tl.float64)
    acc_n = tl.zeros([CHUNK], tl.float64)
    acc_r = tl.zeros([CHUNK], tl.float64)
    lane = tl.arange(0, CHUNK).to(tl.int64)
    for k in range(0, count, CHUNK):
        j = k + lane
        valid = j < count
        acc_f += tl.load(part_ptr + first + j, mask=valid, other=0.0)
        acc_n += tl.load(part_ptr + n_blocks + first + j, mask=valid, other=0.0)
        acc_r += tl.load(part_ptr + 2 * n_blocks + first + j, mask=valid, other=0.0)
    tl.store(out_ptr + 3 * layer, tl.sum(acc_f, axis=0))
    tl.store(out_ptr + 3 * layer + 1, tl.sum(acc_n, axis=0))
    tl.store(out_ptr + 3 * layer + 2, tl.sum(acc_r, axis=0))


# ------------------------------------------------------------------------------ checks
def _check_device(t: Tensor, device: torch.device, name: str) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (the device of the scores)")


def _check_runs_on(device: torch.device, what: str) -> None:
    if device.type != "cuda" and not (INTERPRET and device.type == "cpu"):
        raise ValueError(
            f"the Triton kernels take CUDA tensors, got {what} on {device} "
            "(CPU tensors only in Triton's interpreter, TRITON_INTERPRET=1)"
        )


def _check_scores(scores: Tensor) -> None:
    if not isinstance(scores, Tensor):
        raise ValueError(f"scores must be a tensor, got {type(scores).__name__}")
    _check_runs_on(scores.device, "scores")
    if scores.dtype != torch.float32 or scores.dim() != 1 or not scores.is_contiguous():
        raise ValueError(
            f"scores must be a flat contiguous float32 tensor, got {scores.dtype} of shape {tuple(scores.shape)}"
        )


def _check_seed(seed: Tensor, device: torch.device) -> None:
    if not isinstance(seed, Tensor) or seed.dtype != torch.int64 or seed.dim() != 0:
        what = f"{seed.dtype} of shape {tuple(seed.shape)}" if isinstance(seed, Tensor) else type(seed).__name__
        raise ValueError(f"seed must be a 0-d int64 tensor, got {what}")
    _check_device(seed, device, "seed")


def _check_weights(scores: Tensor, weights: Sequence[Tensor]) -> None:
    total = 0
    for k, w in enumerate(weights):
        if not isinstance(w, Tensor):
            raise ValueError(f"weights[{k}] must be a tensor, got {type(w).__name__}")
        _check_device(w, scores.device, f"weights[{k}]")
        if w.dtype not in _DTYPES:
            raise ValueError(f"weights[{k}] is {w.dtype}; the kernels take float32, bfloat16 and float16")
        if not w.is_contiguous():
            raise ValueError(f"weights[{k}] is not contiguous")
        total += w.numel()
    if total != scores.numel():
        raise ValueError(f"the weights have {total} elements in all, the scores {scores.numel()}: they must match")


def _check_params(temperature: float, limits: tuple[float, float, float]) -> tuple[float, float, float, float]:
    try:
        cap, mask_min, dmask_min = (float(x) for x in limits)
        temperature = float(temperature)
    except (TypeError, ValueError) as e:
        raise ValueError(f"temperature must be a number and limits three numbers, got {temperature!r}, {limits!r}") from e
    return temperature, cap, mask_min, dmask_min


def _grid(offset: int, n: int, rows: int = _ROWS) -> tuple[int]:
    return (triton.cdiv((offset & 3) + n, 4 * rows),)


# ------------------------------------------------------------------------------ host functions
def uniform(n: int, seed: int | Tensor, offset: int = 0, device: torch.device | str | None = None) -> Tensor:
    """The kernels' uniforms in [0, 1) of flat indices ``offset .. offset + n`` under ``seed``
    (a non-negative 63-bit int, or a 0-d int64 tensor), as a float32 tensor on ``device``."""
    if isinstance(seed, Tensor):
        device = seed.device if device is None else torch.device(device)
        _check_seed(seed, device)
    else:
        device = torch.device("cuda" if device is None else device)
        if not 0 <= operator.index(seed) < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    _check_runs_on(device, "uniform")
    if not isinstance(seed, Tensor):
        seed = torch.tensor(seed, dtype=torch.int64, device=device)
    n, offset = operator.index(n), operator.index(offset)
    if n < 0 or offset < 0 or offset + n > 2**62:
        raise ValueError(f"need 0 <= n and 0 <= offset with offset + n <= 2**62, got n={n}, offset={offset}")
    out = torch.empty(n, dtype=torch.float32, device=device)
    if n:
        _uniform_kernel[_grid(offset, n, _UNIFORM_ROWS)](out, seed, n, offset, ROWS=_UNIFORM_ROWS, num_warps=4)
    return out


def philox(counter: Sequence[int], key: Sequence[int], device: torch.device | str | None = None) -> tuple[int, ...]:
    """Philox-4x32-10 of one counter (four 32-bit words) under a key (two words), computed by the
    kernels' Philox on ``device``: for checking it against published answers."""
    words = [operator.index(x) for x in (*counter, *key)]
    if len(counter) != 4 or len(key) != 2 or not all(0 <= x < 2**32 for x in words):
        raise ValueError(f"need four counter and two key words of 32 bits, got {counter!r}, {key!r}")
    device = torch.device("cuda" if device is None else device)
    _check_runs_on(device, "philox")
    io = torch.tensor(words, dtype=torch.int64, device=device)
    _philox_kernel[(1,)](io, num_warps=1)
    return tuple(int(x) for x in io[:4].tolist())


def relaxed_forward(
    scores: Tensor, weights: Sequence[Tensor], temperature: float, seed: Tensor, limits: tuple[float, float, float]
) -> list[Tensor]:
    """``w_l * m_l`` for every layer (same shape and dtype as ``w_l``), ``m`` the relaxed masks of
    the flat float32 ``scores`` (the layers back to back, in the order of ``weights``) with the
    noise of ``seed`` (a 0-d int64 tensor on the scores' device). ``limits`` = (cap on |z|, smallest
    mask value kept, smallest a(1 - a) kept), see :func:`probmask.numerics.limits`."""
    _check_scores(scores)
    _check_weights(scores, weights)
    _check_seed(seed, scores.device)
    temperature, cap, mask_min, dmask_min = _check_params(temperature, limits)
    outs, offset = [], 0
    for w in weights:
        n = w.numel()
        out = torch.empty_like(w)
        if n:
            _relaxed_kernel[_grid(offset, n)](
                scores, w, w, out, out, scores, seed, n, offset, temperature, cap, mask_min, dmask_min,
                FORWARD=True, NEED_W=False, NEED_S=False, OUT_BF16=w.dtype == torch.bfloat16,
                ROWS=_ROWS, ACCURATE=_ACCURATE, num_warps=4, enable_fp_fusion=False,
            )
        outs.append(out)
        offset += n
    return outs


def relaxed_backward(
    scores: Tensor,
    weights: Sequence[Tensor],
    grads: Sequence[Tensor],
    temperature: float,
    seed: Tensor,
    limits: tuple[float, float, float],
    need_scores: bool,
    need_weights: Sequence[bool],
) -> tuple[Tensor | None, list[Tensor | None]]:
    """The gradients of :func:`relaxed_forward`'s outputs given their gradients ``grads``: the
    flat score gradient (float32, shape of ``scores``) if ``need_scores``, and each weight's
    gradient (its dtype) where ``need_weights`` says so; ``None`` for the others. The noise and
    the logits are regenerated from ``seed``: the masks are those of the forward pass, bit for bit."""
    _check_scores(scores)
    _check_weights(scores, weights)
    _check_seed(seed, scores.device)
    temperature, cap, mask_min, dmask_min = _check_params(temperature, limits)
    need_weights = [bool(x) for x in need_weights]
    if len(grads) != len(weights) or len(need_weights) != len(weights):
        raise ValueError(
            f"{len(weights)} weights need as many grads and need_weights, got {len(grads)} and {len(need_weights)}"
        )
    for k, (w, g) in enumerate(zip(weights, grads)):
        if not isinstance(g, Tensor):
            raise ValueError(f"grads[{k}] must be a tensor, got {type(g).__name__}")
        _check_device(g, scores.device, f"grads[{k}]")
        if g.dtype not in _DTYPES or g.shape != w.shape:
            raise ValueError(
                f"grads[{k}] must be float32, bfloat16 or float16 of the weight's shape {tuple(w.shape)}, "
                f"got {g.dtype} of shape {tuple(g.shape)}"
            )
    grad_s = torch.empty_like(scores) if need_scores else None
    grad_ws: list[Tensor | None] = []
    offset = 0
    for w, g, need_w in zip(weights, grads, need_weights):
        n = w.numel()
        gw = torch.empty_like(w) if need_w else None
        if n and (need_w or need_scores):
            g = g.contiguous()
            _relaxed_kernel[_grid(offset, n)](
                scores, w, g, w, w if gw is None else gw, scores if grad_s is None else grad_s, seed,
                n, offset, temperature, cap, mask_min, dmask_min,
                FORWARD=False, NEED_W=need_w, NEED_S=bool(need_scores), OUT_BF16=w.dtype == torch.bfloat16,
                ROWS=_ROWS, ACCURATE=_ACCURATE, num_warps=4, enable_fp_fusion=False,
            )
        grad_ws.append(gw)
        offset += n
    return grad_s, grad_ws


@functools.lru_cache(maxsize=16)
def _sums_table(starts: tuple[int, ...], sizes: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """For a layout of layer slices: the layer of every block (int32) and, per layer, int64 rows
    (start, size, first block, block count). Built once per layout and device."""
    counts = [-(-n // _SUM_BLOCK) for n in sizes]
    firsts, total = [], 0
    for c in counts:
        firsts.append(total)
        total += c
    meta = torch.tensor([list(starts), list(sizes), firsts, counts], dtype=torch.int64)
    block_layer = torch.repeat_interleave(torch.arange(len(sizes), dtype=torch.int32), torch.tensor(counts))
    return block_layer.to(device), meta.to(device)


def clamp_sums(scores: Tensor, starts: Sequence[int], sizes: Sequence[int], thresholds: Tensor) -> Tensor:
    """For layer slices ``scores[start : start + size]`` and their float32 thresholds ``c`` (one per
    layer, or one for all): a float64 tensor [layers, 3] of (sum clamp(s - c, 0, 1), #{s > c}, sum s).

    ``s - c`` is rounded to float32 as in PyTorch; the sums are float64 and deterministic (the same
    bits on every run). The raw sum shows NaN and inf that the clamp hides."""
    _check_scores(scores)
    try:
        starts = tuple(operator.index(a) for a in starts)
        sizes = tuple(operator.index(n) for n in sizes)
    except TypeError as e:
        raise ValueError("starts and sizes must be sequences of ints") from e
    if len(starts) != len(sizes):
        raise ValueError(f"{len(starts)} starts for {len(sizes)} sizes")
    for a, n in zip(starts, sizes):
        if a < 0 or n < 0 or a + n > scores.numel():
            raise ValueError(f"the slice [{a}, {a} + {n}) is not within the {scores.numel()} scores")
    if not isinstance(thresholds, Tensor) or thresholds.dtype != torch.float32:
        what = thresholds.dtype if isinstance(thresholds, Tensor) else type(thresholds).__name__
        raise ValueError(f"thresholds must be a float32 tensor, got {what}")
    _check_device(thresholds, scores.device, "thresholds")
    m = len(sizes)
    if thresholds.numel() not in (1, m):
        raise ValueError(f"thresholds must have one element per layer ({m}) or one, got {thresholds.numel()}")
    n_blocks = sum(-(-n // _SUM_BLOCK) for n in sizes)
    if n_blocks == 0:
        return torch.zeros((m, 3), dtype=torch.float64, device=scores.device)
    out = torch.empty((m, 3), dtype=torch.float64, device=scores.device)  # every row written
    block_layer, meta = _sums_table(starts, sizes, scores.device)
    c = thresholds.reshape(-1)
    parts = torch.empty(3 * n_blocks, dtype=torch.float64, device=scores.device)
    _sums_kernel[(n_blocks,)](
        scores, c, 0 if c.numel() == 1 else 1, block_layer, meta, m, parts, n_blocks,
        BLOCK=_SUM_BLOCK, num_warps=8,
    )
    _sums_reduce_kernel[(m,)](parts, n_blocks, meta, m, out, CHUNK=_SUM_CHUNK, num_warps=4)
    return out
