"""The ``pt`` and ``safetensors`` formats: the state_dict with zeros in place, the masks beside it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor

from probmask.atomic_io import atomic_write
from probmask.export.common import (
    KIND_KEY,
    MASK_PREFIX,
    META_KEY,
    Checkpoint,
    CheckpointError,
    _check_masks,
    _complete_meta,
    _load_safetensors_tensors,
    _plain,
    _read_meta,
    _safetensors_header,
)

__all__ = ["save_pt", "save_safetensors"]


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
    header = {META_KEY: json.dumps(meta), KIND_KEY: "dense"}
    return atomic_write(path, lambda tmp: save_file(_plain(tensors), tmp, metadata=header))


def _load_pt(path: Path) -> Checkpoint:
    """Read a ``.pt`` file with ``torch.load(weights_only=True)``: tensors and plain values only.

    Only PyTorch's zip format is read (``torch.save``'s default since PyTorch 1.6, and what
    :func:`save_pt` writes): there PyTorch checks every tensor's declared size against the bytes
    stored for it. The legacy format allocates the declared sizes before reading anything.
    """
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            raise CheckpointError(
                f"{path} is in PyTorch's legacy (pre-1.6) serialization format, which probmask does not "
                "read: it is not a file that probmask wrote"
            )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        text = str(err)
        lower = text.lower()
        # PyTorch's weights_only messages advise weights_only=False, i.e. running code from the file:
        # never passed on
        if "unsupported" in lower or "blocked" in lower:
            raise CheckpointError(
                f"{path} holds objects other than tensors and plain values (dicts, lists, numbers, "
                "strings); probmask does not load those, and a probmask model file never holds them"
            ) from None
        if "weights only" in lower or "weights_only" in lower:
            raise CheckpointError(f"{path} is corrupted: its pickled data cannot be read") from None
        first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
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
    keys = meta.get("keys")
    order = [e.get("name") for e in keys if isinstance(e, dict)] if isinstance(keys, list) else []
    if all(isinstance(k, str) for k in order) and sorted(order) == sorted(state):
        # safetensors sorts keys; restore the state_dict order
        state = {k: state[k] for k in order}
        masks = {k: masks[k] for k in order if k in masks}
    return Checkpoint(state, masks, meta)
