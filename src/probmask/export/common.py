"""What every model file holds (:class:`Checkpoint`), its metadata, and the helpers the formats share."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from probmask.report import Report

__all__ = [
    "FORMATS", "SUFFIXES", "Checkpoint", "CheckpointError", "describe_mismatch", "layer_stats", "load_into", "make_meta",
]

FORMAT_VERSION = 1
FORMATS = ("pt", "safetensors", "sparse", "onnx")
SUFFIXES = {"pt": ".pt", "safetensors": ".safetensors", "sparse": ".sparse.safetensors", "onnx": ".onnx"}
MASK_PREFIX = "masks/"
META_KEY = "probmask"
KIND_KEY = "probmask_format"  # "dense" or "sparse" in the safetensors header metadata


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


def _rows_cols(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    rows = int(shape[0])
    return rows, (math.prod(shape) // rows if rows else 0)


def _safetensors_header(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:  # safetensors raises its own error types for broken headers
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from None


def _read_meta(header: Mapping[str, str], path: Path) -> dict[str, Any]:
    if META_KEY not in header:
        return {}
    try:
        meta = json.loads(header[META_KEY])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: the metadata block is not valid JSON ({err})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: the metadata block is nested too deeply") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: the metadata block is not a JSON object")
    return meta


def _load_safetensors_tensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:
        raise CheckpointError(f"{path} is corrupted or truncated: {err}") from None


def describe_mismatch(own: Mapping[str, Any], theirs: Mapping[str, Any]) -> str | None:
    """What keeps the tensors ``theirs`` (a file's state_dict) from fitting ``own`` (a model's):
    missing / unexpected keys and differing shapes (both named), or None if they fit.

    Only ``.shape`` is read from the values, so ``own`` may hold meta tensors.
    """
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    shapes = [
        f"{k}: file {tuple(theirs[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in theirs and tuple(own[k].shape) != tuple(theirs[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"missing keys {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    if unexpected:
        parts.append(f"unexpected keys {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}")
    if shapes:
        parts.append(f"shape mismatch {shapes[:3]}{' ...' if len(shapes) > 3 else ''}")
    return "; ".join(parts) or None


def load_into(model: nn.Module, ckpt: Checkpoint) -> nn.Module:
    """Load the checkpoint's weights into ``model``; explain any architecture mismatch.

    Raises :class:`CheckpointError` naming missing / unexpected keys and shape mismatches, so
    that a file for a different architecture fails with a readable message.
    """
    mismatch = describe_mismatch(model.state_dict(), ckpt.state_dict)
    if mismatch:
        what = ckpt.meta.get("model")
        what = what if isinstance(what, str) and len(what) <= 100 and what.isprintable() else "an unknown model"
        raise CheckpointError(f"the file (saved from {what!s}) does not fit this {type(model).__name__}: {mismatch}")
    model.load_state_dict(ckpt.state_dict)
    return model
