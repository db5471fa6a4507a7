"""Run a finalized (pruned) model with ``torch.sparse`` CSR matrices on the CPU.

:func:`to_sparse` returns a copy of the model in which each sufficiently sparse ``nn.Linear``
(and, where it pays, ``nn.Conv2d``) is replaced by a module holding its weight as a CSR matrix
with 32-bit indices; everything else is left alone. Inference only (no gradients to the weights).

Why these choices, as measured on a 2-core Xeon (see ``benchmarks/inference.py``):

* ``W_csr @ x.T`` with int32 indices is the fast path for batches: about 20x a dense 4096x4096
  product at 99% sparsity and 3.5x at 90% (batch 64); int64 indices cost up to 1.7x more. The
  other orientation (``x @ W.T`` with ``W.T`` in CSR) is 10-100x slower, so is never used.
* For a single input row, SciPy's CSR matrix-vector product over the same arrays (no copy) is
  about 1.7x faster than torch's (4096x4096: 1.0 ms vs 1.8 ms at 10% density, 0.11 vs 0.16 ms at
  1%; dense 2.6 ms); torch's is used where SciPy is missing, for autograd inputs and off the CPU.
* A convolution as ``unfold`` + sparse matmul only pays for small feature maps at batch 1 (late
  ResNet stages: 1.7-5x at 90-99% sparsity); with large maps or batches the unfolded input costs
  more than the convolution saved (0.2-0.6x). Convolutions are therefore converted only when
  asked (``convs=True``) and, with ``example_input``, only where a timing on the real input shows
  the sparse layer is faster.
"""

from __future__ import annotations

import copy
import functools
import logging
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as _np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # optional: a faster matrix-vector product for single inputs (mlxtend already needs SciPy)
    import scipy.sparse as _scipy_sparse
except ImportError:  # pragma: no cover - SciPy is there wherever mlxtend is
    _scipy_sparse = None

__all__ = ["SparseConv2d", "SparseLinear", "csr32", "sparse_layers", "to_sparse"]

log = logging.getLogger(__name__)

_SUPPORTED_DTYPES = (torch.float32, torch.float64)
_SCIPY_MIN_NNZ = 4096  # below this, SciPy's per-call overhead (~2 us more) outweighs its faster loop


def csr32(matrix: Tensor) -> Tensor:
    """A 2-D dense matrix as a CSR tensor with int32 indices (faster than the default int64)."""
    if matrix.dim() != 2:
        raise ValueError(f"csr32 needs a 2-D matrix, got shape {tuple(matrix.shape)}")
    with warnings.catch_warnings():  # "sparse CSR support is in beta": known, and tested here
        warnings.simplefilter("ignore", UserWarning)
        csr = matrix.detach().to_sparse_csr()
    return _csr(csr.crow_indices().to(torch.int32), csr.col_indices().to(torch.int32), csr.values(),
                tuple(matrix.shape))


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size=shape, check_invariants=False)


class _CSRWeight(nn.Module):
    """Holds a CSR weight as three plain buffers, so that copy, ``.to()`` and ``state_dict`` work.

    CSR tensors themselves cannot be deep-copied or saved as buffers everywhere; the CSR view of
    the buffers is built once and rebuilt only when a buffer is replaced (``.to()``, loading).
    """

    _shape: tuple[int, int]
    _cache: tuple[Tensor, Tensor, Tensor, Tensor] | None = None  # (crow, col, values, csr)
    _scipy: tuple[Tensor, Tensor, Tensor, Any] | None = None  # (crow, col, values, scipy csr_matrix)

    def _set_weight(self, matrix: Tensor) -> None:
        csr = csr32(matrix)
        self._shape = (int(matrix.shape[0]), int(matrix.shape[1]))
        self.register_buffer("crow_indices", csr.crow_indices())
        self.register_buffer("col_indices", csr.col_indices())
        self.register_buffer("values", csr.values())

    @property
    def weight(self) -> Tensor:
        """The weight as a 2-D CSR tensor (``(out, in)``, or ``(out, in * kh * kw)`` for a conv).

        It aliases the buffers (in-place changes such as ``load_state_dict`` show through) and is
        rebuilt only when a buffer object is replaced (``.to()``, ``.double()``).
        """
        buffers = self._buffers
        crow, col, values = buffers["crow_indices"], buffers["col_indices"], buffers["values"]
        cache = self._cache
        if cache is None or cache[0] is not crow or cache[1] is not col or cache[2] is not values:
            assert crow is not None and col is not None and values is not None
            cache = (crow, col, values, _csr(crow, col, values, self._shape))
            self._cache = cache
        return cache[3]

    def _scipy_matrix(self) -> Any:
        """The weight as a ``scipy.sparse.csr_matrix`` sharing the buffers' memory, or None.

        SciPy's matrix-vector kernel is about 1.7x faster than torch's CSR path for a single
        input row (measured at 1-15% density); None where SciPy is missing or the buffers are not
        on the CPU.
        """
        buffers = self._buffers
        crow, col, values = buffers["crow_indices"], buffers["col_indices"], buffers["values"]
        cache = self._scipy
        if cache is None or cache[0] is not crow or cache[1] is not col or cache[2] is not values:
            assert crow is not None and col is not None and values is not None
            matrix = None
            if _scipy_sparse is not None and values.device.type == "cpu":
                matrix = _scipy_sparse.csr_matrix(
                    (values.numpy(), col.numpy(), crow.numpy()), shape=self._shape, copy=False)
                if not _np.shares_memory(matrix.data, values.numpy()):  # never serve stale weights
                    matrix = None
            cache = (crow, col, values, matrix)
            self._scipy = cache
        return cache[3]

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = None  # a CSR tensor cannot be pickled or deep-copied; rebuilt on use
        state["_scipy"] = None
        return state


def _density(weight: Tensor) -> float:
    return float((weight != 0).sum()) / max(1, weight.numel())


class SparseLinear(_CSRWeight):
    """``nn.Linear`` for inference with its weight as a CSR matrix (int32 indices)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, *, use_scipy: bool = True) -> None:
        super().__init__()
        if weight.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"sparse CSR matmul supports float32/float64 weights, not {weight.dtype}")
        self.out_features, self.in_features = weight.shape
        self.use_scipy = use_scipy  # one input row: SciPy's CSR matrix-vector product (faster)
        self._set_weight(weight)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_dense(cls, linear: nn.Linear, *, use_scipy: bool = True) -> SparseLinear:
        return cls(linear.weight, linear.bias, use_scipy=use_scipy)

    def forward(self, x: Tensor) -> Tensor:
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if (x2.shape[0] == 1 and self.use_scipy and self.values.numel() >= _SCIPY_MIN_NNZ
                and not x2.requires_grad and x2.dtype == self.values.dtype):
            matrix = self._scipy_matrix()
            if matrix is not None:
                y = torch.from_numpy(matrix @ x2[0].numpy()).unsqueeze(0)
                if self.bias is not None:
                    y = y + self.bias
                return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)
        # (out, in) CSR @ (in, N) with a row-major right-hand side, as MKL's sparse mm wants it.
        # The result is returned as a transposed view of the (out, N) product: a following
        # SparseLinear then gets its (in, N) operand without a copy.
        rhs = x2.t().contiguous()
        bias = self.bias
        y = torch.mm(self.weight, rhs) if bias is None else torch.addmm(bias.unsqueeze(1), self.weight, rhs)
        y = y.t()
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def to_dense(self) -> nn.Linear:
        """The equivalent ``nn.Linear`` (zeros where the weight was not stored)."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          dtype=self.values.dtype)
        with torch.no_grad():
            dense.weight.copy_(self.weight.to_dense())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def extra_repr(self) -> str:
        density = self.nnz / max(1, self.in_features * self.out_features)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, density={density:.4f}")


def _conv_supported(conv: nn.Conv2d) -> bool:
    return (
        type(conv) is nn.Conv2d
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and conv.weight.dtype in _SUPPORTED_DTYPES
    )


class SparseConv2d(_CSRWeight):
    """``nn.Conv2d`` (groups=1, zero padding) for inference as ``unfold`` + CSR matmul."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if not _conv_supported(conv):
            raise ValueError(
                "SparseConv2d supports nn.Conv2d with groups=1, integer padding and "
                "padding_mode='zeros' in float32/float64"
            )
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size: tuple[int, int] = tuple(conv.kernel_size)  # type: ignore[assignment]
        self.stride: tuple[int, int] = tuple(conv.stride)  # type: ignore[assignment]
        self.padding: tuple[int, int] = tuple(conv.padding)  # type: ignore[assignment]
        self.dilation: tuple[int, int] = tuple(conv.dilation)  # type: ignore[assignment]
        self._set_weight(conv.weight.reshape(self.out_channels, -1))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        n, _, h, w = x.shape
        kh, kw = self.kernel_size
        out_h = (h + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        out_w = (w + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # (N, C*kh*kw, L)
        length = cols.shape[-1]
        if n == 1:
            y = torch.mm(self.weight, cols[0]).unsqueeze(0)
        else:
            rhs = cols.transpose(0, 1).reshape(cols.shape[1], n * length)
            y = torch.mm(self.weight, rhs).reshape(self.out_channels, n, length).transpose(0, 1)
        if self.bias is not None:
            y = y + self.bias.unsqueeze(1)
        y = y.reshape(n, self.out_channels, out_h, out_w)
        return y[0] if unbatched else y

    def extra_repr(self) -> str:
        numel = self.out_channels * self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, density={self.nnz / numel:.4f}")


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def _layer_inputs(model: nn.Module, names: list[str], example_input: Any) -> dict[str, Tensor]:
    """The input each named submodule sees in one forward pass on ``example_input``."""
    seen: dict[str, Tensor] = {}
    handles = []
    for name in names:
        def hook(module: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            seen.setdefault(name, args[0].detach())
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def to_sparse(
    model: nn.Module,
    *,
    max_density: float = 0.35,
    convs: bool = False,
    example_input: Tensor | tuple[Tensor, ...] | None = None,
    repeats: int = 5,
    inplace: bool = False,
    use_scipy: bool = True,
) -> nn.Module:
    """A copy of ``model`` with its sparse ``nn.Linear`` (and optionally ``nn.Conv2d``) on CSR.

    A layer is converted when its weight density (fraction nonzero) is at most ``max_density``.
    With ``example_input``, each candidate is also timed dense vs sparse on the input it really
    receives (median of ``repeats`` runs) and kept dense unless the sparse version is faster:
    the conversion is then never a slowdown on this machine, for that input size.
    The result is for inference on the CPU; outputs match the dense model to float rounding.
    ``use_scipy=False`` keeps single-row inputs on torch's CSR product too.
    """
    if not 0.0 <= max_density <= 1.0:
        raise ValueError(f"max_density must lie in [0, 1], got {max_density}")
    out = model if inplace else copy.deepcopy(model)
    out.eval()
    candidates: dict[str, nn.Module] = {}
    for name, module in out.named_modules():
        if type(module) is nn.Linear and module.weight.dtype in _SUPPORTED_DTYPES:
            factory: Callable[[Any], nn.Module] = functools.partial(SparseLinear.from_dense, use_scipy=use_scipy)
        elif convs and isinstance(module, nn.Conv2d) and _conv_supported(module):
            factory = SparseConv2d
        else:
            continue
        if _density(module.weight) <= max_density:
            candidates[name] = factory(module)
    if example_input is not None and candidates:
        inputs = _layer_inputs(out, list(candidates), example_input)
        for name in list(candidates):
            if name not in inputs:  # never called in the forward pass: leave it dense
                del candidates[name]
                continue
            x, dense, sparse = inputs[name], out.get_submodule(name), candidates[name]
            with torch.inference_mode():
                t_dense = _median_time(lambda d=dense, x=x: d(x), repeats)
                t_sparse = _median_time(lambda s=sparse, x=x: s(x), repeats)
            if t_sparse >= t_dense:
                log.info("to_sparse: %s stays dense (sparse %.3g ms >= dense %.3g ms)",
                         name, 1e3 * t_sparse, 1e3 * t_dense)
                del candidates[name]
    for name, new in candidates.items():
        if not name:  # the model itself is a Linear / Conv2d
            return new
        parent_name, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent_name), child, new)
    log.info("to_sparse: %d layer(s) on CSR: %s", len(candidates), list(candidates))
    return out


def sparse_layers(model: nn.Module) -> list[str]:
    """Names of the submodules that run on CSR matrices."""
    return [n for n, m in model.named_modules() if isinstance(m, (SparseLinear, SparseConv2d))]
