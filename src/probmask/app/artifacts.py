"""The files of a run directory, and rebuilding a saved model: shared by ``run``, ``eval`` and ``export``.

A run directory holds:

* ``config.yaml`` -- the resolved configuration;
* ``metrics.jsonl`` -- one JSON object per epoch: ``phase`` (main / finetune), ``epoch``,
  ``train_loss``, ``train_acc``, ``test_loss``, ``test_acc`` (percent), ``budget`` (keep ratio),
  ``temperature``, ``density`` (expected kept fraction from the scores; exact once fixed),
  ``lr``, ``score_lr``, ``time_s``;
* ``checkpoint.pt`` -- see :mod:`probmask.app.checkpoint`;
* ``results.json`` -- ``test_accuracy`` (percent, the finalized model on the test set),
  ``sparsity`` / ``kept`` / ``total`` (recounted from the finalized weights: zeros among the
  prunable weights), ``layers`` (``{name, shape, numel, kept, density}`` each) and run facts;
  written last, so its presence means the run is complete;
* ``model.pt`` -- the finalized plain model, see :func:`save_model`;
* ``layer_density.png`` and ``training.png``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from probmask import export
from probmask.app.errors import UserError
from probmask.atomic_io import atomic_write_file

__all__ = [
    "CHECKPOINT", "CONFIG", "LAYER_PLOT", "METRICS", "MODEL", "RESULTS", "RUN_FILES", "TRAINING_PLOT",
    "load_model", "model_file", "read_model_file", "rebuild", "save_model", "write_json", "write_outputs",
]

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"
RESULTS = "results.json"
MODEL = "model.pt"
LAYER_PLOT = "layer_density.png"
TRAINING_PLOT = "training.png"
RUN_FILES = (CONFIG, METRICS, CHECKPOINT, RESULTS, MODEL, LAYER_PLOT, TRAINING_PLOT)


def write_json(path: Path, data: Any) -> None:
    atomic_write_file(path, lambda f: f.write(json.dumps(data, indent=2) + "\n"), mode="w")


def save_model(path: str | Path, model: nn.Module, masks: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
    """Save a finalized plain model as ``model.pt`` with :func:`probmask.export.save_pt` (atomically).

    The file is ``torch.save({"state_dict", "masks", "meta"})`` with only tensors and plain
    values, so ``torch.load(path, weights_only=True)`` reads it:

    * ``state_dict`` -- the plain model's own ``state_dict`` (original keys, pruned weights are 0);
    * ``masks`` -- ``{parameter name: bool tensor}`` for every pruned parameter;
    * ``meta`` -- ``model`` (registry name, e.g. ``"resnet32"`` or ``"torchvision:resnet50"``),
      ``model_options`` (builder keyword options), ``num_classes``, ``input_shape`` (``[C, H, W]``),
      ``data``, ``method``, ``test_accuracy``, ``config`` (the resolved configuration as plain
      dicts), and the mask statistics ``kept``, ``total``, ``sparsity``, ``layers`` and
      ``format_version`` added by :mod:`probmask.export`.

    :func:`load_model` rebuilds it.
    """
    export.save_pt(export.Checkpoint(model.state_dict(), dict(masks), dict(meta)), path)


def model_file(source: str | Path) -> Path:
    """The model file of a finished run directory, or ``source`` itself if it is a file."""
    path = Path(source)
    if path.is_dir():
        model = path / MODEL
        if not model.is_file():
            state = (f"it has no {RESULTS} either: the run has not finished"
                     if not (path / RESULTS).is_file() else f"{RESULTS} is there but {MODEL} is not")
            raise UserError(f"{path} has no {MODEL} ({state}); pass a finished run directory or a model file")
        return model
    if not path.exists():
        raise UserError(f"{path} does not exist")
    return path


def read_model_file(path: Path) -> export.Checkpoint:
    """Load a model file; a file that is not one (or is damaged) is a :class:`UserError`."""
    try:
        return export.load(path)
    except export.CheckpointError as err:
        raise UserError(str(err)) from None


def rebuild(ckpt: export.Checkpoint, where: Path) -> nn.Module:
    """Build the architecture named in the metadata and load the weights into it (eval mode)."""
    from probmask.app.models import build_model, check_input

    meta = ckpt.meta
    missing = [k for k in ("model", "num_classes", "input_shape") if k not in meta]
    if missing:
        raise UserError(
            f"{where} has no {', '.join(missing)} in its metadata, so the model cannot be rebuilt; "
            "load it into your own model with torch / safetensors instead"
        )
    options = meta.get("model_options") or {}
    if not isinstance(options, dict):
        raise UserError(f"{where}: model_options in the metadata is not a mapping")
    try:
        num_classes = int(meta["num_classes"])
        input_shape = [int(s) for s in meta["input_shape"]]
    except (TypeError, ValueError):
        raise UserError(f"{where}: num_classes / input_shape in the metadata are malformed") from None
    try:
        model = build_model(str(meta["model"]), num_classes=num_classes, input_shape=input_shape, **options)
        export.load_into(model, ckpt)
        check_input(model, input_shape, str(meta["model"]))
    except (UserError, export.CheckpointError) as err:
        raise UserError(f"{where}: cannot rebuild the model: {err}") from None
    return model.eval()


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Tensor], dict[str, Any]]:
    """Rebuild the model saved by :func:`save_model` (or any model file of a registered
    architecture): ``(model in eval mode, masks, meta)``."""
    path = model_file(path)
    ckpt = read_model_file(path)
    return rebuild(ckpt, path), ckpt.masks, ckpt.meta


def write_outputs(run_dir: Path, model: nn.Module, masks: Mapping[str, Tensor], meta: Mapping[str, Any],
                  results: Mapping[str, Any], history: Sequence[Mapping[str, Any]], title: str) -> None:
    """model.pt, the two plots, then results.json (last: its presence means the run is complete)."""
    from probmask.app.plots import plot_layer_density, plot_training

    save_model(run_dir / MODEL, model, masks, meta)
    plot_layer_density(results["layers"], run_dir / LAYER_PLOT, title=f"kept weights per layer: {title}")
    plot_training(history, run_dir / TRAINING_PLOT, title=title)
    write_json(run_dir / RESULTS, results)
