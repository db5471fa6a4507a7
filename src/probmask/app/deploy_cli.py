"""``probmask export`` and ``probmask eval``: a finished run (or a model file) to files and figures.

``register(subparsers)`` adds both subcommands to the main ``probmask`` parser; each sets
``func`` to a handler ``(args) -> exit status``. Bad input (a run directory without a finished
model, a corrupted or truncated file, a file for another architecture, a missing export
dependency) prints one line to stderr and returns 2, without a traceback.

``python -m probmask.app.deploy_cli export|eval ...`` runs them without the rest of the CLI.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from probmask.export import FORMATS, SUFFIXES, Checkpoint, CheckpointError, load, load_into, save

__all__ = ["eval_command", "export_command", "main", "register"]

log = logging.getLogger(__name__)

EXIT_USER_ERROR = 2


class _Fail(Exception):
    """A message for the user; the command exits with status 2."""


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


def _source_file(source: str) -> Path:
    path = Path(source)
    if path.is_dir():
        model = path / "model.pt"
        if not model.is_file():
            state = ("it has no results.json either: the run has not finished"
                     if not (path / "results.json").is_file() else "results.json is there but model.pt is not")
            raise _Fail(f"{path} has no model.pt ({state}); pass a finished run directory or a model file")
        return model
    if not path.exists():
        raise _Fail(f"{path} does not exist")
    return path


def _rebuild(ckpt: Checkpoint, where: Path) -> nn.Module:
    """Build the architecture named in the metadata and load the weights into it."""
    from probmask.app.errors import UserError
    from probmask.app.models import build_model, check_input

    meta = ckpt.meta
    missing = [k for k in ("model", "num_classes", "input_shape") if k not in meta]
    if missing:
        raise _Fail(
            f"{where} has no {', '.join(missing)} in its metadata, so the model cannot be rebuilt; "
            "load it into your own model with torch / safetensors instead"
        )
    options = meta.get("model_options") or {}
    if not isinstance(options, dict):
        raise _Fail(f"{where}: model_options in the metadata is not a mapping")
    try:
        num_classes = int(meta["num_classes"])
        input_shape = [int(s) for s in meta["input_shape"]]
    except (TypeError, ValueError):
        raise _Fail(f"{where}: num_classes / input_shape in the metadata are malformed") from None
    try:
        model = build_model(str(meta["model"]), num_classes=num_classes, input_shape=input_shape, **options)
        load_into(model, ckpt)
        check_input(model, input_shape, str(meta["model"]))
    except UserError as err:
        raise _Fail(f"{where}: cannot rebuild the model: {err}") from None
    return model.eval()


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


def export_command(args: argparse.Namespace) -> int:
    """Handler of ``probmask export``."""
    return _guard("export", lambda: _export(args))


def _export(args: argparse.Namespace) -> None:
    model_file = _source_file(args.source)
    ckpt = load(model_file)
    out = Path(args.out) if args.out else _default_out(args.source, model_file, args.format)
    if out.resolve() == model_file.resolve():
        raise _Fail(f"exporting to {out} would overwrite the input: pass --out")
    if args.format == "onnx":
        from probmask.export import export_onnx

        model = _rebuild(ckpt, model_file)
        check = export_onnx(model, out, ckpt.meta["input_shape"], meta=_onnx_meta(ckpt), check=not args.no_check)
        print(f"wrote {out} ({out.stat().st_size:,} bytes, onnx)")
        if check is not None:
            print(f"onnxruntime matches PyTorch: max |diff| {check.max_abs_diff:.2e} on batches "
                  f"{', '.join(map(str, check.batch_sizes))} (tolerance 1e-4)")
        return
    if ckpt.meta.get("model") and ckpt.meta.get("input_shape"):
        _rebuild(ckpt, model_file)  # refuse a file whose weights do not fit its named architecture
    save(ckpt, out, args.format)
    size = out.stat().st_size
    dense = _dense_bytes(ckpt)
    print(f"wrote {out} ({size:,} bytes, {args.format}; the dense weights are {dense:,} bytes: "
          f"{size / dense:.3f}x) sparsity {ckpt.sparsity:.4f}")


def _onnx_meta(ckpt: Checkpoint) -> dict[str, Any]:
    keep = ("model", "model_options", "num_classes", "input_shape", "data", "sparsity", "kept", "total")
    return {k: ckpt.meta[k] for k in keep if k in ckpt.meta}


def eval_command(args: argparse.Namespace) -> int:
    """Handler of ``probmask eval``."""
    return _guard("eval", lambda: _eval(args))


def _test_batches(ckpt: Checkpoint, data_root: str | None, batch_size: int) -> Any:
    """The run's test set as a DataLoader, or a reason why it is not available."""
    from torch.utils.data import DataLoader

    from probmask.app.config import config_from_dict
    from probmask.app.data import load_data
    from probmask.app.errors import UserError

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


def _eval(args: argparse.Namespace) -> None:
    from probmask.evaluate import evaluate

    if args.batch_size < 1:
        raise _Fail(f"--batch-size must be at least 1, got {args.batch_size}")
    model_file = _source_file(args.source)
    ckpt = load(model_file)
    model = _rebuild(ckpt, model_file)
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


def _guard(command: str, run: Any) -> int:
    """Run a command; user-facing failures become one line on stderr and exit status 2."""
    try:
        run()
    except (_Fail, CheckpointError) as err:
        print(f"probmask {command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except ImportError as err:
        print(f"probmask {command}: error: {err.name or err} is not installed; "
              "install the export extras: pip install 'probmask[export]'", file=sys.stderr)
        return EXIT_USER_ERROR
    except ValueError as err:  # e.g. an ONNX output that does not match, a file that cannot be encoded
        print(f"probmask {command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m probmask.app.deploy_cli``: the two commands without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="probmask", description=__doc__.split("\n")[0])
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
