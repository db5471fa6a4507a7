"""Save and load finalized models: ``pt``, ``safetensors``, a compact ``sparse`` file and ONNX.

Every file holds the plain model's ``state_dict`` (pruned weights are zeros in place), the bool
masks of the pruned parameters and a JSON-ready metadata block (model name and options, config,
per-layer density, total sparsity). Loading never unpickles arbitrary objects: ``.pt`` files are
read with ``torch.load(weights_only=True)``, the other formats are safetensors.

Reading the files without probmask
----------------------------------
Rebuild the architecture yourself (torchvision or your own code: the ``state_dict`` keys are the
original model's), then::

    import json, torch, torchvision
    model = torchvision.models.resnet50(num_classes=10)          # or your own nn.Module

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

import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from probmask.atomic_io import atomic_write
from probmask.report import Report

__all__ = [
    "FORMATS",
    "Checkpoint",
    "CheckpointError",
    "OnnxCheck",
    "OnnxMismatch",
    "check_onnx",
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

FORMAT_VERSION = 1
FORMATS = ("pt", "safetensors", "sparse", "onnx")
SUFFIXES = {"pt": ".pt", "safetensors": ".safetensors", "sparse": ".sparse.safetensors", "onnx": ".onnx"}
MASK_PREFIX = "masks/"
_META_KEY = "probmask"
_KIND_KEY = "probmask_format"  # "dense" or "sparse" in the safetensors header metadata


class OnnxMismatch(ValueError):
    """The exported ONNX file's outputs differ from PyTorch's beyond the tolerance."""


class CheckpointError(ValueError):
    """A file that is missing, unreadable, corrupted, or does not fit the model it is loaded into."""


@dataclass
class Checkpoint:
    """A finalized model's weights, masks and metadata, as stored in every format."""

    state_dict: dict[str, Tensor]
    masks: dict[str, Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def kept(self) -> int:
        return sum(int(m.sum()) for m in self.masks.values())

    @property
    def total(self) -> int:
        return sum(m.numel() for m in self.masks.values())

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / self.total if self.total else 0.0


# ---------------------------------------------------------------------------------- metadata
def layer_stats(masks: Mapping[str, Tensor]) -> list[dict[str, Any]]:
    """Per pruned parameter: name, shape, numel, kept and density."""
    return [layer.summary() for layer in Report.count_nonzero(masks).layers]


def make_meta(masks: Mapping[str, Tensor], **info: Any) -> dict[str, Any]:
    """The metadata block: ``info`` (model, model_options, config, ...) plus the mask statistics.

    Everything is normalised through JSON so that it loads with ``weights_only=True`` and fits a
    safetensors header.
    """
    layers = layer_stats(masks)
    kept = sum(layer["kept"] for layer in layers)
    total = sum(layer["numel"] for layer in layers)
    meta = dict(info)
    meta.update(
        format_version=FORMAT_VERSION, kept=kept, total=total,
        sparsity=1.0 - kept / total if total else 0.0, layers=layers,
    )
    try:
        return json.loads(json.dumps(meta))
    except TypeError as err:
        raise ValueError(f"metadata must be JSON-serialisable: {err}") from None


def _complete_meta(ckpt: Checkpoint) -> dict[str, Any]:
    """The checkpoint's metadata with the mask statistics recomputed from its masks."""
    info = {k: v for k, v in ckpt.meta.items() if k not in {"format_version", "kept", "total", "layers"}}
    info.pop("sparsity", None)
    return make_meta(ckpt.masks, **info)


# ---------------------------------------------------------------------------------- helpers
def _plain(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU tensors that share no storage (safetensors refuses shared ones)."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[name] = t
    return out


def _check_masks(state_dict: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> None:
    for name, mask in masks.items():
        if name not in state_dict:
            raise CheckpointError(f"mask {name!r} has no weight of that name in the state_dict")
        if mask.dtype != torch.bool:
            raise CheckpointError(f"mask {name!r} has dtype {mask.dtype}, expected torch.bool")
        if tuple(mask.shape) != tuple(state_dict[name].shape):
            raise CheckpointError(
                f"mask {name!r} has shape {tuple(mask.shape)} but its weight "
                f"{tuple(state_dict[name].shape)}"
            )


# ---------------------------------------------------------------------------------- saving
def save_pt(ckpt: Checkpoint, path: str | os.PathLike) -> Path:
    """``torch.save({"state_dict", "masks", "meta"})``: plain tensors, dicts, lists and scalars."""
    _check_masks(ckpt.state_dict, ckpt.masks)
    payload = {
        "state_dict": _plain(ckpt.state_dict),
        "masks": _plain(ckpt.masks),
        "meta": _complete_meta(ckpt),
    }
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def save_safetensors(ckpt: Checkpoint, path: str | os.PathLike) -> Path:
    """One safetensors file: the weights under their own names, the masks under ``masks/``.

    The header metadata holds ``probmask`` (the metadata JSON; its ``"keys"`` lists the
    state_dict keys in order with shape and dtype) and ``probmask_format = "dense"``.
    """
    from safetensors.torch import save_file

    _check_masks(ckpt.state_dict, ckpt.masks)
    clash = [k for k in ckpt.state_dict if k.startswith(MASK_PREFIX)]
    if clash:
        raise ValueError(f"state_dict keys {clash[:3]} use the reserved prefix {MASK_PREFIX!r}")
    tensors = dict(ckpt.state_dict)
    tensors.update({MASK_PREFIX + k: v for k, v in ckpt.masks.items()})
    meta = _complete_meta(ckpt)
    meta["keys"] = [
        {"name": k, "shape": list(t.shape), "dtype": str(t.dtype), "encoding": "dense"}
        for k, t in ckpt.state_dict.items()
    ]
    header = {_META_KEY: json.dumps(meta), _KIND_KEY: "dense"}
    return atomic_write(path, lambda tmp: save_file(_plain(tensors), tmp, metadata=header))


def _rows_cols(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    rows = int(shape[0])
    return rows, (math.prod(shape) // rows if rows else 0)


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
    header = {_META_KEY: json.dumps(meta), _KIND_KEY: "sparse"}
    return atomic_write(path, lambda tmp: save_file(_plain(tensors), tmp, metadata=header))


def save(ckpt: Checkpoint, path: str | os.PathLike, format: str) -> Path:
    """Save in ``format`` (``pt``, ``safetensors`` or ``sparse``; ONNX needs :func:`export_onnx`)."""
    savers = {"pt": save_pt, "safetensors": save_safetensors, "sparse": save_sparse}
    if format not in savers:
        raise ValueError(f"unknown format {format!r}: choose one of {sorted(savers)} (or export_onnx)")
    return savers[format](ckpt, path)


# ---------------------------------------------------------------------------------- loading
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
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "pt"
    (header_len,) = struct.unpack("<Q", head[:8])
    if head[8:9] == b"{":
        if header_len + 8 > path.stat().st_size:
            raise CheckpointError(f"{path} is a truncated safetensors file")
        return _safetensors_kind(path)
    if path.suffix == ".onnx":
        return "onnx"
    raise CheckpointError(
        f"{path} is neither a PyTorch (.pt), safetensors nor sparse file written by probmask"
    )


def _safetensors_header(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:  # safetensors raises its own error types for broken headers
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from None


def _safetensors_kind(path: Path) -> str:
    return "sparse" if _safetensors_header(path).get(_KIND_KEY) == "sparse" else "safetensors"


def _read_meta(header: Mapping[str, str], path: Path) -> dict[str, Any]:
    if _META_KEY not in header:
        return {}
    try:
        meta = json.loads(header[_META_KEY])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: the metadata block is not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: the metadata block is not a JSON object")
    return meta


def _load_safetensors_tensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:
        raise CheckpointError(f"{path} is corrupted or truncated: {err}") from None


def _load_pt(path: Path) -> Checkpoint:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise CheckpointError(
                f"{path} holds Python objects other than tensors and plain containers; "
                "probmask refuses to unpickle them (weights_only=True)"
            ) from None
        raise CheckpointError(f"{path} is corrupted or truncated: {first}") from None
    if not isinstance(obj, dict) or "state_dict" not in obj:
        raise CheckpointError(
            f"{path} is a PyTorch file but not a probmask model file: expected a dict with "
            "'state_dict', 'masks' and 'meta'"
        )
    state_dict, masks, meta = obj["state_dict"], obj.get("masks", {}), obj.get("meta", {})
    if not isinstance(state_dict, dict) or not all(isinstance(v, Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path}: 'state_dict' is not a mapping of names to tensors")
    if not isinstance(masks, dict) or not all(isinstance(v, Tensor) for v in masks.values()):
        raise CheckpointError(f"{path}: 'masks' is not a mapping of names to tensors")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: 'meta' is not a dict")
    return Checkpoint(dict(state_dict), dict(masks), meta)


def _load_dense_safetensors(path: Path) -> Checkpoint:
    meta = _read_meta(_safetensors_header(path), path)
    tensors = _load_safetensors_tensors(path)
    state = {k: v for k, v in tensors.items() if not k.startswith(MASK_PREFIX)}
    masks = {k[len(MASK_PREFIX):]: v for k, v in tensors.items() if k.startswith(MASK_PREFIX)}
    order = [e.get("name") for e in meta.get("keys", []) if isinstance(e, dict)]
    if sorted(order) == sorted(state):  # safetensors sorts keys; restore the state_dict order
        state = {k: state[k] for k in order}
        masks = {k: masks[k] for k in order if k in masks}
    return Checkpoint(state, masks, meta)


def _decode_entry(entry: Mapping[str, Any], tensors: Mapping[str, Tensor], path: Path) -> tuple[Tensor, Tensor | None]:
    name, encoding = entry["name"], entry["encoding"]
    shape = tuple(int(s) for s in entry["shape"])
    numel = math.prod(shape)

    def get(key: str) -> Tensor:
        if key not in tensors:
            raise CheckpointError(f"{path}: tensor {key!r} is missing")
        return tensors[key]

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


def load_into(model: nn.Module, ckpt: Checkpoint) -> nn.Module:
    """Load the checkpoint's weights into ``model``; explain any architecture mismatch.

    Raises :class:`CheckpointError` naming missing / unexpected keys and shape mismatches, so
    that a file for a different architecture fails with a readable message.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in ckpt.state_dict]
    unexpected = [k for k in ckpt.state_dict if k not in own]
    shapes = [
        f"{k}: file {tuple(ckpt.state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in ckpt.state_dict and tuple(own[k].shape) != tuple(ckpt.state_dict[k].shape)
    ]
    if missing or unexpected or shapes:
        what = ckpt.meta.get("model", "an unknown model")
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}")
        if shapes:
            parts.append(f"shape mismatch {shapes[:3]}{' ...' if len(shapes) > 3 else ''}")
        raise CheckpointError(
            f"the file (saved from {what}) does not fit this {type(model).__name__}: " + "; ".join(parts)
        )
    model.load_state_dict(ckpt.state_dict)
    return model


# ---------------------------------------------------------------------------------- ONNX
@dataclass(frozen=True)
class OnnxCheck:
    """Result of running the exported file with onnxruntime against PyTorch."""

    path: Path
    max_abs_diff: float
    batch_sizes: tuple[int, ...]


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    input_shape: tuple[int, ...] | list[int],
    *,
    meta: Mapping[str, Any] | None = None,
    check: bool = True,
    atol: float = 1e-4,
    opset: int | None = None,
) -> OnnxCheck | None:
    """Export ``model`` (in eval mode) with ``torch.onnx`` with a dynamic batch dimension.

    ``input_shape`` is one example's shape (``[C, H, W]``, or ``[features]``). ``meta`` goes into
    the ONNX ``metadata_props`` under ``probmask``. With ``check``, onnxruntime runs batches of
    1 and 3 random inputs and the outputs must match PyTorch within ``atol`` (else :class:`OnnxMismatch`).
    """
    import onnx

    path = Path(path)
    model = model.eval()
    example = torch.randn(2, *input_shape)
    kwargs: dict[str, Any] = {"dynamo": True, "verbose": False, "optimize": True,
                              "dynamic_shapes": ({0: torch.export.Dim("batch")},),
                              "input_names": ["input"], "output_names": ["output"]}
    if opset is not None:
        kwargs["opset_version"] = opset
    with torch.no_grad():
        program = torch.onnx.export(model, (example,), **kwargs)
    proto = program.model_proto
    if meta is not None:
        entry = proto.metadata_props.add()
        entry.key, entry.value = _META_KEY, json.dumps(meta)
    atomic_write(path, lambda tmp: onnx.save_model(proto, tmp))
    if not check:
        return None
    return check_onnx(model, path, input_shape, atol=atol)


def check_onnx(
    model: nn.Module, path: str | os.PathLike, input_shape: tuple[int, ...] | list[int], *, atol: float = 1e-4
) -> OnnxCheck:
    """Run ``path`` with onnxruntime on random batches of 1 and 3 and compare with ``model``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    model = model.eval()
    for batch in (1, 3):
        x = torch.randn(batch, *input_shape, generator=generator)
        with torch.no_grad():
            expected = model(x)
        got = torch.from_numpy(session.run(None, {name: x.numpy()})[0])
        if got.shape != expected.shape:
            raise OnnxMismatch(f"ONNX output shape {tuple(got.shape)} differs from PyTorch's {tuple(expected.shape)}")
        worst = max(worst, float((got - expected).abs().max()))
    if worst > atol:
        raise OnnxMismatch(f"ONNX output differs from PyTorch by {worst:.3g} > {atol}")
    return OnnxCheck(Path(path), worst, (1, 3))
