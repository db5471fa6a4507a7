"""Save and load finalized models: ``pt``, ``safetensors``, a compact ``sparse`` file and ONNX.

Every file holds the plain model's ``state_dict`` (pruned weights are zeros in place), the bool
masks of the pruned parameters and a JSON-ready metadata block (model name and options, config,
per-layer density, total sparsity). Loading never unpickles arbitrary objects: ``.pt`` files are
read with ``torch.load(weights_only=True)`` (PyTorch's zip format only: the legacy format
allocates declared sizes before reading them), the other formats are safetensors. Every tensor
is checked against the bytes stored for it before anything of its declared size is allocated;
a file that does not fit raises :class:`CheckpointError` naming the tensor.

Reading the files without probmask
----------------------------------
Rebuild the architecture yourself (torchvision or your own code: the ``state_dict`` keys are the
original model's), then::

    import json, torch, torchvision
    model = torchvision.models.mobilenet_v3_small(num_classes=10)  # or your own nn.Module

    # .pt (the run directory's model.pt is this format)
    ckpt = torch.load("model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(ckpt["state_dict"])
    masks, meta = ckpt["masks"], ckpt["meta"]                     # {name: bool tensor}, dict

    # .safetensors: masks are stored beside the weights under the prefix "masks/"
    from safetensors import safe_open
    from safetensors.torch import load_file
    tensors = load_file("model.safetensors")
    model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("masks/")})
    masks = {k[len("masks/"):]: v for k, v in tensors.items() if k.startswith("masks/")}
    with safe_open("model.safetensors", "pt") as f:
        meta = json.loads(f.metadata()["probmask"])

The ``sparse`` format (also a safetensors file, so equally safe to open) stores each pruned
weight in whichever of two encodings is smaller, decided per tensor:

* CSR with 32-bit indices: ``8 * nnz + 4 * (rows + 1)`` bytes (float32) -- best at high sparsity
  (it wins below about 3% density: at 99% sparsity a weight costs 0.08 bytes instead of 4);
* values + bitmask: ``4 * nnz + numel / 8`` bytes -- best at moderate sparsity (at 90% it needs
  0.53 bytes per weight where CSR needs 0.8).

Both encode the mask itself (not "where the weight is nonzero"), so weights and masks come back
bit for bit. :func:`load` decodes it; the layout is described in :func:`save_sparse`.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from probmask.export.common import (
    FORMATS,
    KIND_KEY,
    SUFFIXES,
    Checkpoint,
    CheckpointError,
    _check_masks,
    _safetensors_header,
    describe_mismatch,
    layer_stats,
    load_into,
    make_meta,
)
from probmask.export.compact import _load_sparse, save_sparse, sparse_nbytes
from probmask.export.dense import _load_dense_safetensors, _load_pt, save_pt, save_safetensors
from probmask.export.onnx import OnnxCheck, OnnxMismatch, check_onnx, export_onnx

__all__ = [
    "FORMATS",
    "SUFFIXES",
    "Checkpoint",
    "CheckpointError",
    "OnnxCheck",
    "OnnxMismatch",
    "check_onnx",
    "describe_mismatch",
    "detect_format",
    "export_onnx",
    "layer_stats",
    "load",
    "load_into",
    "make_meta",
    "save",
    "save_pt",
    "save_safetensors",
    "save_sparse",
    "sparse_nbytes",
]


def save(ckpt: Checkpoint, path: str | os.PathLike, format: str) -> Path:
    """Save in ``format`` (``pt``, ``safetensors`` or ``sparse``; ONNX needs :func:`export_onnx`)."""
    savers = {"pt": save_pt, "safetensors": save_safetensors, "sparse": save_sparse}
    if format not in savers:
        raise ValueError(f"unknown format {format!r}: choose one of {sorted(savers)} (or export_onnx)")
    return savers[format](ckpt, path)


def detect_format(path: str | os.PathLike) -> str:
    """``pt``, ``safetensors``, ``sparse`` or ``onnx``, from the file's content, not its name."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a model file")
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) < 8:
        raise CheckpointError(f"{path} is empty or truncated ({len(head)} bytes)")
    if head[:4] == b"PK\x03\x04":
        return "pt"
    # safetensors before the legacy pickle test: the header length's first byte may be 0x80
    (header_len,) = struct.unpack("<Q", head[:8])
    if head[8:9] == b"{":
        if header_len + 8 > path.stat().st_size:
            raise CheckpointError(f"{path} is a truncated safetensors file")
        return _safetensors_kind(path)
    if head[:1] == b"\x80":
        return "pt"  # a pickle: PyTorch's legacy format, which load() refuses
    if path.suffix == ".onnx":
        return "onnx"
    raise CheckpointError(
        f"{path} is neither a PyTorch (.pt), safetensors nor sparse file written by probmask"
    )


def _safetensors_kind(path: Path) -> str:
    return "sparse" if _safetensors_header(path).get(KIND_KEY) == "sparse" else "safetensors"


def load(path: str | os.PathLike) -> Checkpoint:
    """Load a ``pt``, ``safetensors`` or ``sparse`` file (the format is read from the content).

    Raises :class:`CheckpointError` with a one-line reason for anything unreadable.
    """
    path = Path(path)
    kind = detect_format(path)
    if kind == "onnx":
        raise CheckpointError(f"{path} is an ONNX model: run it with onnxruntime, not probmask.load")
    if kind == "pt":
        ckpt = _load_pt(path)
    elif kind == "sparse":
        ckpt = _load_sparse(path)
    else:
        ckpt = _load_dense_safetensors(path)
    _check_masks(ckpt.state_dict, ckpt.masks)
    return ckpt
