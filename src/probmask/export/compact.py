"""The compact ``sparse`` format: each masked weight as CSR or values + bitmask, whichever is smaller.

Loading checks the key table before decoding anything: every declared shape must fit the data
stored for it (a dense tensor's own shape, ``rows + 1`` row pointers, ``ceil(numel / 8)``
bitmask bytes, no more values than elements), the whole file may declare at most
:data:`MAX_DENSE_ELEMENTS` elements, and decoding may not need more than :data:`MAX_EXPANSION`
times the bytes the file stores (plus 16 MiB): beyond about 99.95% sparsity overall. A file that
does not fit is a :class:`~probmask.export.common.CheckpointError` naming the tensor.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from probmask.atomic_io import atomic_write
from probmask.export.common import (
    KIND_KEY,
    META_KEY,
    Checkpoint,
    CheckpointError,
    _check_masks,
    _complete_meta,
    _load_safetensors_tensors,
    _plain,
    _read_meta,
    _rows_cols,
    _safetensors_header,
)

__all__ = ["save_sparse", "sparse_nbytes"]


def _encoding_sizes(mask: Tensor, element_size: int) -> dict[str, int]:
    """Bytes each encoding needs for one masked tensor."""
    nnz = int(mask.sum())
    rows, cols = _rows_cols(mask.shape)
    sizes = {"bitmask": (mask.numel() + 7) // 8 + nnz * element_size}
    if cols < 2**31 and nnz < 2**31:
        sizes["csr"] = 4 * (rows + 1) + 4 * nnz + nnz * element_size
    return sizes


def sparse_nbytes(state_dict: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> int:
    """Payload bytes of the ``sparse`` format: best encoding per masked tensor, others dense."""
    total = 0
    for name, t in state_dict.items():
        if name in masks:
            total += min(_encoding_sizes(masks[name], t.element_size()).values())
        else:
            total += t.numel() * t.element_size()
    return total


def _pack_bits(flat: Tensor) -> Tensor:
    pad = (-flat.numel()) % 8
    bits = torch.cat([flat.to(torch.uint8), flat.new_zeros(pad, dtype=torch.uint8)]).view(-1, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    return (bits * weights).sum(1, dtype=torch.uint8)


def _unpack_bits(packed: Tensor, numel: int) -> Tensor:
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((packed.unsqueeze(1) >> shifts) & 1).view(-1)[:numel].bool()


def save_sparse(ckpt: Checkpoint, path: str | os.PathLike) -> Path:
    """The compact format: a safetensors file with each masked weight CSR- or bitmask-encoded.

    Tensors, per state_dict key ``k``:

    * not masked: ``dense/k`` as is;
    * CSR (weight viewed as ``(shape[0], -1)``): ``csr/k/crow`` int32 (rows + 1),
      ``csr/k/col`` int32 (nnz), ``csr/k/values`` (nnz, the weight's dtype);
    * bitmask: ``bitmask/k/bits`` uint8 (ceil(numel / 8), bit ``i % 8`` of byte ``i // 8`` is
      flat position ``i``, row-major), ``bitmask/k/values`` (the kept values in row-major order).

    The header metadata holds ``probmask`` (the metadata JSON, with ``"keys"``: every key in
    order with its shape, dtype and encoding) and ``probmask_format = "sparse"``.
    Raises ``ValueError`` if a weight is nonzero where its mask is False (finalize first).
    """
    from safetensors.torch import save_file

    _check_masks(ckpt.state_dict, ckpt.masks)
    tensors: dict[str, Tensor] = {}
    keys = []
    for name, t in ckpt.state_dict.items():
        t = t.detach().cpu()
        entry: dict[str, Any] = {"name": name, "shape": list(t.shape), "dtype": str(t.dtype)}
        mask = ckpt.masks.get(name)
        if mask is None:
            entry["encoding"] = "dense"
            tensors[f"dense/{name}"] = t
        else:
            mask = mask.cpu()
            if bool((t[~mask] != 0).any()):
                raise ValueError(
                    f"{name} is nonzero where its mask is False: save the finalized model "
                    "(ProbMask.finalize() multiplies the mask in)"
                )
            sizes = _encoding_sizes(mask, t.element_size())
            encoding = min(sizes, key=lambda k: sizes[k])
            entry["encoding"] = encoding
            if encoding == "csr":
                rows, cols = _rows_cols(mask.shape)
                m2 = mask.reshape(rows, cols)
                crow = torch.zeros(rows + 1, dtype=torch.int64)
                crow[1:] = m2.sum(1).cumsum(0)
                tensors[f"csr/{name}/crow"] = crow.to(torch.int32)
                tensors[f"csr/{name}/col"] = m2.nonzero()[:, 1].to(torch.int32)
                tensors[f"csr/{name}/values"] = t.reshape(rows, cols)[m2]
            else:
                flat = mask.reshape(-1)
                tensors[f"bitmask/{name}/bits"] = _pack_bits(flat)
                tensors[f"bitmask/{name}/values"] = t.reshape(-1)[flat]
        keys.append(entry)
    meta = _complete_meta(ckpt)
    meta["keys"] = keys
    header = {META_KEY: json.dumps(meta), KIND_KEY: "sparse"}
    return atomic_write(path, lambda tmp: save_file(_plain(tensors), tmp, metadata=header))


# A file's declared shapes are checked against what it stores before anything is decoded, so that a
# damaged or crafted file cannot make the loader allocate more than it plausibly holds.
MAX_DIMS = 8
MAX_EXPANSION = 2**11  # declared dense bytes (weights + masks) per stored byte: ~99.95% sparsity overall
EXPANSION_SLACK = 2**24  # bytes any file may declare beyond MAX_EXPANSION times its size
MAX_DENSE_ELEMENTS = 2**32  # per file: more than any torchvision classification model holds


def _entry_shape(entry: object, index: int, seen: set[str], path: Path) -> tuple[str, str, tuple[int, ...]]:
    """``(name, encoding, shape)`` of one key-table entry, checked for type and range."""
    if not isinstance(entry, dict):
        raise CheckpointError(f"{path}: entry {index} of the sparse file's key table is not an object")
    name, encoding, shape = entry.get("name"), entry.get("encoding"), entry.get("shape")
    if not isinstance(name, str):
        raise CheckpointError(f"{path}: entry {index} of the sparse file's key table has no tensor name")
    if name in seen:
        raise CheckpointError(f"{path}: tensor {name!r} appears twice in the sparse file's key table")
    seen.add(name)
    if encoding not in ("dense", "csr", "bitmask"):
        raise CheckpointError(f"{path}: unknown encoding {encoding!r} for {name!r}")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
        shown = repr(shape) if len(repr(shape)) <= 80 else repr(shape)[:77] + "..."
        raise CheckpointError(f"{path}: tensor {name!r} declares shape {shown}: not a list of at most "
                              f"{MAX_DIMS} non-negative integers")
    return name, encoding, tuple(shape)


def _stored(tensors: Mapping[str, Tensor], key: str, path: Path) -> Tensor:
    if key not in tensors:
        raise CheckpointError(f"{path}: tensor {key!r} is missing")
    return tensors[key]


def _stored_fits(name: str, encoding: str, shape: tuple[int, ...], tensors: Mapping[str, Tensor],
                 path: Path) -> int:
    """Check that the tensors stored for ``name`` can hold ``shape``; the bytes decoding it allocates."""
    numel = math.prod(shape)

    def get(key: str) -> Tensor:
        return _stored(tensors, key, path)

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: the {encoding} data of {name!r} does not fit its declared shape "
                               f"{list(shape)} ({why})")

    if encoding == "dense":
        t = get(f"dense/{name}")
        if tuple(t.shape) != shape:
            raise bad(f"the stored tensor has shape {list(t.shape)}")
        return 0  # already in memory: decoding allocates nothing
    if encoding == "csr":
        crow, col, values = get(f"csr/{name}/crow"), get(f"csr/{name}/col"), get(f"csr/{name}/values")
        rows, _ = _rows_cols(shape)
        for part, t in (("row pointers", crow), ("column indices", col)):
            if t.dim() != 1 or t.dtype not in (torch.int32, torch.int64):
                raise bad(f"its {part} are not a 1-D integer tensor")
        if values.dim() != 1:
            raise bad("its values are not a 1-D tensor")
        if crow.numel() != rows + 1:
            raise bad(f"{crow.numel()} row pointers for {rows} rows")
        if col.numel() != values.numel() or values.numel() > numel:
            raise bad(f"{col.numel()} column indices and {values.numel()} values")
    else:
        bits, values = get(f"bitmask/{name}/bits"), get(f"bitmask/{name}/values")
        if bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() != (numel + 7) // 8:
            raise bad(f"{bits.numel()} bitmask bytes for {numel} elements")
        if values.dim() != 1 or values.numel() > numel:
            raise bad(f"{values.numel()} values")
    return numel * (values.element_size() + 1)  # the dense weight and its bool mask


def _check_declared_sizes(keys: list, tensors: Mapping[str, Tensor], path: Path) -> None:
    """Refuse a key table whose shapes do not fit the stored tensors, before decoding anything."""
    seen: set[str] = set()
    needs: dict[str, int] = {}
    elements = 0
    for index, entry in enumerate(keys):
        name, encoding, shape = _entry_shape(entry, index, seen, path)
        needs[name] = _stored_fits(name, encoding, shape, tensors, path)
        elements += math.prod(shape)
        if elements > MAX_DENSE_ELEMENTS:
            raise CheckpointError(
                f"{path}: tensor {name!r} (shape {list(shape)}) brings the file's declared size to more than "
                f"{MAX_DENSE_ELEMENTS:,} elements, more than probmask loads from one file"
            )
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    declared = sum(needs.values())
    if declared > MAX_EXPANSION * stored + EXPANSION_SLACK:
        worst = max(needs, key=lambda k: needs[k])
        raise CheckpointError(
            f"{path}: the declared shapes need {declared:,} bytes once decoded but the file stores only "
            f"{stored:,} bytes of tensors (at most {MAX_EXPANSION}x is plausible); the largest is {worst!r}"
        )


def _decode_entry(entry: Mapping[str, Any], tensors: Mapping[str, Tensor], path: Path) -> tuple[Tensor, Tensor | None]:
    name, encoding = entry["name"], entry["encoding"]
    shape = tuple(int(s) for s in entry["shape"])
    numel = math.prod(shape)

    def get(key: str) -> Tensor:
        return _stored(tensors, key, path)

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: the {encoding} data of {name!r} is corrupted ({why})")

    if encoding == "dense":
        t = get(f"dense/{name}")
        if tuple(t.shape) != shape:
            raise bad(f"shape {tuple(t.shape)}, expected {shape}")
        return t, None
    if encoding == "csr":
        crow, col, values = get(f"csr/{name}/crow"), get(f"csr/{name}/col"), get(f"csr/{name}/values")
        rows, cols = _rows_cols(shape)
        crow, col = crow.long(), col.long()
        nnz = col.numel()
        if crow.numel() != rows + 1 or values.numel() != nnz or crow.dim() != 1 or col.dim() != 1:
            raise bad("inconsistent lengths")
        counts = crow.diff()
        if int(crow[0]) != 0 or int(crow[-1]) != nnz or bool((counts < 0).any()):
            raise bad("row pointers")
        if nnz and (int(col.min()) < 0 or int(col.max()) >= cols):
            raise bad("column index out of range")
        row = torch.repeat_interleave(torch.arange(rows), counts)
        if nnz > 1 and bool(((row[1:] == row[:-1]) & (col[1:] <= col[:-1])).any()):
            raise bad("columns not strictly increasing within a row")
        mask = torch.zeros(rows, cols, dtype=torch.bool)
        mask[row, col] = True
        weight = torch.zeros(rows, cols, dtype=values.dtype)
        weight[row, col] = values
        return weight.reshape(shape), mask.reshape(shape)
    if encoding == "bitmask":
        bits, values = get(f"bitmask/{name}/bits"), get(f"bitmask/{name}/values")
        if bits.dtype != torch.uint8 or bits.numel() != (numel + 7) // 8:
            raise bad("bitmask length")
        flat = _unpack_bits(bits, numel)
        if int(flat.sum()) != values.numel():
            raise bad("number of values does not match the bitmask")
        weight = torch.zeros(numel, dtype=values.dtype)
        weight[flat] = values
        return weight.reshape(shape), flat.reshape(shape)
    raise CheckpointError(f"{path}: unknown encoding {encoding!r} for {name!r}")


def _load_sparse(path: Path) -> Checkpoint:
    meta = _read_meta(_safetensors_header(path), path)
    keys = meta.get("keys")
    if not isinstance(keys, list):
        raise CheckpointError(f"{path}: the sparse file's metadata has no key table")
    tensors = _load_safetensors_tensors(path)
    _check_declared_sizes(keys, tensors, path)
    state: dict[str, Tensor] = {}
    masks: dict[str, Tensor] = {}
    for entry in keys:
        try:
            weight, mask = _decode_entry(entry, tensors, path)
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            if isinstance(err, CheckpointError):
                raise
            raise CheckpointError(f"{path}: the sparse data is corrupted ({err})") from None
        state[entry["name"]] = weight
        if mask is not None:
            masks[entry["name"]] = mask
    return Checkpoint(state, masks, meta)
