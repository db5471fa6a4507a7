"""``probmask export`` and ``probmask eval``: a finished run (or a model file) to files and figures.

``register(subparsers)`` adds both subcommands to the main ``probmask`` parser; each sets
``func`` to a handler ``(args) -> exit status``. Bad input (a run directory without a finished
model, a corrupted or truncated file, a file for another architecture, a missing export
dependency) raises :class:`~probmask.app.errors.UserError`: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from probmask.app import artifacts
from probmask.app.errors import UserError
from probmask.export import FORMATS, SUFFIXES, Checkpoint, save

__all__ = ["eval_command", "export_command", "register"]


def register(subparsers: Any) -> None:
    """Add ``export`` and ``eval`` to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "export",
        help="write a finished run's pruned model as pt, safetensors, sparse or onnx",
        description="Write the finalized model of RUN_DIR (its model.pt) or of a model file in another "
        "format: pt / safetensors (weights with zeros in place + masks + metadata), sparse (compact: "
        "CSR or bitmask per tensor), onnx (checked against PyTorch with onnxruntime).",
    )
    p.add_argument("source", metavar="RUN_DIR_OR_FILE", help="a run directory or a pt / safetensors / sparse file")
    p.add_argument("--format", required=True, choices=FORMATS, help="output format")
    p.add_argument("--out", metavar="FILE", help="output file (default: RUN_DIR/export/model.<ext>, "
                   "or beside the input file)")
    p.add_argument("--no-check", action="store_true", help="onnx: skip the onnxruntime comparison")
    p.set_defaults(func=export_command)

    e = subparsers.add_parser(
        "eval",
        help="test accuracy, sparsity, bytes and MACs of a finished run or model file",
        description="Rebuild the model of RUN_DIR (its model.pt) or of a model file and report test "
        "accuracy, sparsity, dense and sparse parameter bytes, and dense and effective "
        "multiply-accumulates per example, per layer and in total.",
    )
    e.add_argument("source", metavar="RUN_DIR_OR_FILE", help="a run directory or a pt / safetensors / sparse file")
    e.add_argument("--no-accuracy", action="store_true", help="skip the test-set accuracy")
    e.add_argument("--data-root", metavar="DIR", help="where the data set lives (default: the run's data.root)")
    e.add_argument("--batch-size", type=int, default=256, help="evaluation batch size (default 256)")
    e.add_argument("--json", action="store_true", help="print the report as JSON")
    e.set_defaults(func=eval_command)


def _default_out(source: str, model_file: Path, fmt: str) -> Path:
    if Path(source).is_dir():
        return Path(source) / "export" / f"model{SUFFIXES[fmt]}"
    stem = model_file.name
    for suffix in sorted(SUFFIXES.values(), key=len, reverse=True):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return model_file.with_name(stem + SUFFIXES[fmt])


def _dense_bytes(ckpt: Checkpoint) -> int:
    return sum(t.numel() * t.element_size() for t in ckpt.state_dict.values())


def _optional(module: str) -> Any:
    """Import an optional export dependency, or say how to install it."""
    try:
        return __import__(module)
    except ImportError:
        raise UserError(f"{module} is not installed; install the export extras: "
                        "pip install 'probmask[export]'") from None


def export_command(args: argparse.Namespace) -> int:
    """Handler of ``probmask export``."""
    model_file = artifacts.model_file(args.source)
    ckpt = artifacts.read_model_file(model_file)
    out = Path(args.out) if args.out else _default_out(args.source, model_file, args.format)
    if out.resolve() == model_file.resolve():
        raise UserError(f"exporting to {out} would overwrite the input: pass --out")
    if args.format == "onnx":
        from probmask.export import OnnxMismatch, export_onnx

        for module in ("onnx", "onnxscript", "onnxruntime"):
            _optional(module)
        model = artifacts.rebuild(ckpt, model_file)
        try:
            check = export_onnx(model, out, ckpt.meta["input_shape"], meta=_onnx_meta(ckpt), check=not args.no_check)
        except OnnxMismatch as err:
            raise UserError(f"{err}; the file was written to {out} (pass --no-check to skip the comparison)") from None
        print(f"wrote {out} ({out.stat().st_size:,} bytes, onnx)")
        if check is not None:
            print(f"onnxruntime matches PyTorch: max |diff| {check.max_abs_diff:.2e} on batches "
                  f"{', '.join(map(str, check.batch_sizes))} (tolerance 1e-4)")
        return 0
    if ckpt.meta.get("model") and ckpt.meta.get("input_shape"):
        artifacts.rebuild(ckpt, model_file)  # refuse a file whose weights do not fit its named architecture
    if args.format in ("safetensors", "sparse"):
        _optional("safetensors")
    save(ckpt, out, args.format)
    size = out.stat().st_size
    dense = _dense_bytes(ckpt)
    print(f"wrote {out} ({size:,} bytes, {args.format}; the dense weights are {dense:,} bytes: "
          f"{size / dense:.3f}x) sparsity {ckpt.sparsity:.4f}")
    return 0


def _onnx_meta(ckpt: Checkpoint) -> dict[str, Any]:
    keep = ("model", "model_options", "num_classes", "input_shape", "data", "sparsity", "kept", "total")
    return {k: ckpt.meta[k] for k in keep if k in ckpt.meta}


def _test_batches(ckpt: Checkpoint, data_root: str | None, batch_size: int) -> Any:
    """The run's test set as a DataLoader, or a reason why it is not available."""
    from torch.utils.data import DataLoader

    from probmask.app.config import config_from_dict
    from probmask.app.data import load_data

    config = ckpt.meta.get("config")
    if not isinstance(config, dict):
        return "the file's metadata has no run config naming its data set"
    try:
        cfg = config_from_dict(config, where="the file's config")
        if data_root is not None:
            cfg.data.root = data_root
        splits = load_data(cfg.data)
    except UserError as err:
        return f"{err} (probmask eval --data-root DIR points at the data)"
    if list(splits.input_shape) != list(ckpt.meta["input_shape"]):
        return f"the data set's examples are {list(splits.input_shape)}, the model's {ckpt.meta['input_shape']}"
    return DataLoader(splits.test, batch_size=batch_size, shuffle=False)


def eval_command(args: argparse.Namespace) -> int:
    """Handler of ``probmask eval``."""
    from probmask.evaluate import evaluate

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    model_file = artifacts.model_file(args.source)
    ckpt = artifacts.read_model_file(model_file)
    model = artifacts.rebuild(ckpt, model_file)
    batches = None
    note = None
    if not args.no_accuracy:
        batches = _test_batches(ckpt, args.data_root, args.batch_size)
        if isinstance(batches, str):
            note, batches = f"test accuracy not measured: {batches}", None
    example = torch.zeros(1, *[int(s) for s in ckpt.meta["input_shape"]])
    report = evaluate(model, ckpt.masks, example, batches)
    if args.json:
        data = report.to_dict()
        data["source"] = str(model_file)
        data["model"] = ckpt.meta.get("model")
        data["recorded_test_accuracy"] = ckpt.meta.get("test_accuracy")
        if note:
            data["note"] = note
        print(json.dumps(data, indent=2))
    else:
        print(f"{model_file}: {ckpt.meta.get('model')} on {ckpt.meta.get('data', 'unknown data')}")
        print(report.format())
        recorded = ckpt.meta.get("test_accuracy")
        if isinstance(recorded, (int, float)):
            print(f"(the run recorded a test accuracy of {recorded:.2f}%)")
    if note:
        print(note, file=sys.stderr)
    return 0
