"""``probmask export`` and ``probmask eval``: a finished run (or a model file) to files and figures.

``register(subparsers)`` adds both subcommands to the main ``probmask`` parser; each sets
``func`` to a handler ``(args) -> exit status``. Bad input (a run directory without a finished
model, a corrupted or truncated file, a file for another architecture, a missing export
dependency, an output path that exists or cannot be written) raises
:class:`~probmask.app.errors.UserError`: one line on stderr, exit status 2.

Model files are data, not instructions: both commands use a file's metadata only to rebuild
its architecture (checked against its weights before anything is allocated, see
:func:`probmask.app.artifacts.check_architecture`). Where ``eval`` reads its test set is the
user's choice (``--data``, ``--data-root``, ``--download``); the run config stored in the file
is never read. ``export`` never replaces an existing file without ``--force``, and leaves nothing
behind (no folder, no partial file) when it fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
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
                   "or beside the input file); an existing file is kept unless --force is given")
    p.add_argument("--force", action="store_true", help="replace the output file if it exists")
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
    e.add_argument("--data", metavar="NAME", help="the data set whose test split measures the accuracy "
                   "(default: the one the file names, if it is a registered data set)")
    e.add_argument("--data-root", metavar="DIR", default="data",
                   help="where the data set lives (default: ./data; the bundled mnist5k needs none)")
    e.add_argument("--download", action="store_true",
                   help="let torchvision download the data set into --data-root (default: never download)")
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


def _check_out(out: Path, fmt: str, *, force: bool, default: bool) -> None:
    """Refuse, before anything is read or written, an output path that cannot or must not be written."""
    flag = "--out" if not default else "the default output"
    if out.is_dir():
        raise UserError(f"{flag} {out} is a folder: pass a file path, e.g. --out {out / ('model' + SUFFIXES[fmt])}")
    if out.exists() or out.is_symlink():
        if not force:
            other = "--out FILE to write elsewhere" if default else "another --out"
            raise UserError(f"{out} exists already: pass --force to replace it, or {other}")
        if not out.is_file():
            raise UserError(f"{out} exists and is not a regular file: choose another --out")
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"cannot write {out}: {folder} is a file, not a folder; choose another --out")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {out}: the folder {folder} is not writable; choose another --out "
                        "or change its permissions")


def _make_folders(out: Path) -> list[Path]:
    """Create ``out``'s missing parent folders; the ones created, outermost first."""
    missing = []
    folder = out.parent
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    missing.reverse()
    for folder in missing:
        folder.mkdir()
    return missing


def _remove_folders(created: list[Path]) -> None:
    for folder in reversed(created):
        try:
            folder.rmdir()  # only if still empty
        except OSError:
            break


def export_command(args: argparse.Namespace) -> int:
    """Handler of ``probmask export``."""
    model_file = artifacts.model_file(args.source)
    out = Path(args.out) if args.out else _default_out(args.source, model_file, args.format)
    if out.resolve() == model_file.resolve():
        raise UserError(f"exporting to {out} would overwrite the input: pass --out")
    _check_out(out, args.format, force=args.force, default=not args.out)
    ckpt = artifacts.read_model_file(model_file)
    if args.format == "onnx":
        from probmask.export import OnnxMismatch, export_onnx

        model = artifacts.rebuild(ckpt, model_file)  # first: importing onnxruntime writes to ~/.cache
        for module in ("onnx", "onnxscript", "onnxruntime"):
            _optional(module)
        meta = _onnx_meta(ckpt)
        created = _make_folders(out)
        try:
            check = export_onnx(model, out, list(ckpt.meta["input_shape"]), meta=meta, check=not args.no_check)
        except OnnxMismatch as err:
            raise UserError(f"{err}; the file was written to {out} (pass --no-check to skip the comparison)") from None
        except BaseException:
            _remove_folders(created)
            raise
        print(f"wrote {out} ({out.stat().st_size:,} bytes, onnx)")
        if check is not None:
            print(f"onnxruntime matches PyTorch: max |diff| {check.max_abs_diff:.2e} on batches "
                  f"{', '.join(map(str, check.batch_sizes))} (tolerance 1e-4)")
        return 0
    if ckpt.meta.get("model") is not None and "input_shape" in ckpt.meta:
        artifacts.rebuild(ckpt, model_file)  # refuse a file whose weights do not fit its named architecture
    if args.format in ("safetensors", "sparse"):
        _optional("safetensors")
    created = _make_folders(out)
    try:
        save(ckpt, out, args.format)
    except ValueError as err:  # metadata that is not JSON, weights outside their masks
        _remove_folders(created)
        raise UserError(f"cannot export {model_file}: {err}") from None
    except BaseException:
        _remove_folders(created)
        raise
    size = out.stat().st_size
    dense = _dense_bytes(ckpt)
    ratio = f": {size / dense:.3f}x" if dense else ""
    print(f"wrote {out} ({size:,} bytes, {args.format}; the dense weights are {dense:,} bytes{ratio}) "
          f"sparsity {ckpt.sparsity:.4f}")
    return 0


def _onnx_meta(ckpt: Checkpoint) -> dict[str, Any]:
    keep = ("model", "model_options", "num_classes", "input_shape", "data", "sparsity", "kept", "total")
    try:
        return json.loads(json.dumps({k: ckpt.meta[k] for k in keep if k in ckpt.meta}))
    except (TypeError, ValueError) as err:
        raise UserError(f"cannot export the metadata to ONNX: it is not JSON ({err})") from None


def _data_name(args: argparse.Namespace, ckpt: Checkpoint) -> str | None:
    """The data set for the accuracy: --data (checked already), else the one the file names if it is
    a registered data set."""
    from probmask.app.data import DATASETS

    if args.data is not None:
        return args.data
    named = ckpt.meta.get("data")
    return named if isinstance(named, str) and named in DATASETS else None


def _eval_hint(message: str) -> str:
    """A data loader's message in the terms of ``probmask eval``'s options."""
    for old, new in (("add data.download=true", "pass --download"), ("set data.download=false", "leave out --download"),
                     ("data.root=", "--data-root "), ("data.root", "--data-root")):
        message = message.replace(old, new)
    return message


def _test_batches(args: argparse.Namespace, name: str | None, input_shape: tuple[int, ...],
                  num_classes: int) -> Any:
    """The test split of data set ``name`` as a DataLoader, or a reason why it is not available.

    Only the command line says where the data is and whether it may be downloaded.
    """
    from torch.utils.data import DataLoader

    from probmask.app.config import DataConfig
    from probmask.app.data import load_data

    if name is None:
        return "the file names no registered data set: pass --data NAME"
    cfg = DataConfig(name=name, root=args.data_root, download=args.download)
    if name == "imagenet":
        if len(input_shape) != 3 or input_shape[1] != input_shape[2]:
            return f"ImageNet's test images are square crops [3, S, S], the model's examples {list(input_shape)}"
        cfg.image_size = input_shape[2]
    try:
        splits = load_data(cfg)
    except UserError as err:
        return _eval_hint(str(err))
    if list(splits.input_shape) != list(input_shape):
        return f"the {name} examples are {list(splits.input_shape)}, the model's {list(input_shape)}"
    if splits.num_classes != num_classes:
        return f"{name} has {splits.num_classes} classes, the model {num_classes}"
    return DataLoader(splits.test, batch_size=args.batch_size, shuffle=False)


def _recorded_accuracy(meta: dict[str, Any]) -> float | None:
    value = meta.get("test_accuracy")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def eval_command(args: argparse.Namespace) -> int:
    """Handler of ``probmask eval``."""
    from probmask.evaluate import evaluate

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    model_file = artifacts.model_file(args.source)
    if args.data is not None:
        from probmask.app.data import DATASETS

        DATASETS.get(args.data)  # an unknown name fails before the model is read
    ckpt = artifacts.read_model_file(model_file)
    model = artifacts.rebuild(ckpt, model_file)  # checks model, num_classes, input_shape and options
    name = str(ckpt.meta["model"])
    input_shape = tuple(ckpt.meta["input_shape"])
    data_name = _data_name(args, ckpt)
    batches = None
    note = None
    if not args.no_accuracy:
        batches = _test_batches(args, data_name, input_shape, int(ckpt.meta["num_classes"]))
        if isinstance(batches, str):
            note, batches = f"test accuracy not measured: {batches}", None
    example = torch.zeros(1, *input_shape)
    report = evaluate(model, ckpt.masks, example, batches)
    recorded = _recorded_accuracy(ckpt.meta)
    if args.json:
        data = report.to_dict()
        data["source"] = str(model_file)
        data["model"] = name
        data["data"] = data_name
        data["recorded_test_accuracy"] = recorded
        if note:
            data["note"] = note
        print(json.dumps(data, indent=2))
    else:
        print(f"{model_file}: {name} on {data_name or 'no registered data set'}")
        print(report.format())
        if recorded is not None:
            print(f"(the run recorded a test accuracy of {recorded:.2f}%)")
    if note:
        print(note, file=sys.stderr)
    return 0
