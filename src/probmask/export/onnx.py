"""ONNX export of a finalized model, checked against PyTorch with onnxruntime."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from probmask.atomic_io import atomic_write
from probmask.export.common import META_KEY

__all__ = ["OnnxCheck", "OnnxMismatch", "check_onnx", "export_onnx"]


class OnnxMismatch(ValueError):
    """The exported ONNX file's outputs differ from PyTorch's beyond the tolerance."""


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
        entry.key, entry.value = META_KEY, json.dumps(meta)
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
