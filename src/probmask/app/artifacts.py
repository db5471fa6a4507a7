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
  prunable weights), ``layers`` (``{name, shape, numel, kept, density}`` each, plus ``role``
  when the model declares roles, e.g. ``vit_tiny``; then also ``roles``: ``{role, layers,
  numel, kept, density}`` per role) and run facts;
  written last, so its presence means the run is complete;
* ``model.pt`` -- the finalized plain model, see :func:`save_model`;
* ``layer_density.png`` and ``training.png``.

A model file is data, not instructions: :func:`rebuild` (used by ``probmask eval`` / ``export``
and :func:`load_model`) reads only ``model``, ``num_classes``, ``input_shape`` and
``model_options`` from its metadata, checks their types and ranges, and compares the
architecture they name with the file's weights on a skeleton that allocates nothing
(:func:`check_architecture`) before building it for real. Nothing else in the metadata (the
run config, its data root or download flag) is acted upon.
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
    "check_architecture", "load_model", "model_file", "read_model_file", "rebuild", "save_model", "write_json",
    "write_outputs",
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


def _show(value: Any, limit: int = 60) -> str:
    """A metadata value for a message: its repr (control characters escaped), cut to ``limit``."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_line(err: BaseException, limit: int = 300) -> str:
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _model_spec(meta: Mapping[str, Any], where: Path) -> tuple[str, int, tuple[int, ...], dict[str, Any]]:
    """``(model, num_classes, input_shape, model_options)`` from the metadata, each checked for type
    and range (nothing is built or allocated here)."""
    from probmask.app.models import check_input_shape, check_model_name

    missing = [k for k in ("model", "num_classes", "input_shape") if k not in meta]
    if missing:
        raise UserError(
            f"{where} has no {', '.join(missing)} in its metadata, so the model cannot be rebuilt; "
            "load it into your own model with torch / safetensors instead"
        )
    name = meta["model"]
    if not isinstance(name, str) or not name.isprintable() or len(name) > 200:
        raise UserError(f"{where}: malformed metadata: model must be a model name, got {_show(name)}")
    try:
        check_model_name(name)
    except UserError as err:
        raise UserError(f"{where}: cannot rebuild the model: {err}") from None
    num_classes = meta["num_classes"]
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise UserError(f"{where}: malformed metadata: num_classes must be a positive integer, "
                        f"got {_show(num_classes)}")
    try:
        input_shape = check_input_shape(meta["input_shape"])
    except UserError as err:
        raise UserError(f"{where}: malformed metadata: {err}") from None
    options = meta.get("model_options")
    if options is None:
        options = {}
    if not isinstance(options, dict) or not all(isinstance(k, str) and k.isidentifier() for k in options):
        raise UserError(f"{where}: malformed metadata: model_options must map option names to values, "
                        f"got {_show(options)}")
    reserved = sorted(set(options) & {"name", "num_classes", "input_shape", "max_tensors"})
    if reserved:
        raise UserError(f"{where}: malformed metadata: model_options may not set {', '.join(reserved)}")
    return name, num_classes, input_shape, dict(options)


def _options_text(options: Mapping[str, Any]) -> str:
    if not options:
        return "no model_options"
    return "model_options " + ", ".join(f"{k}={_show(v, 40)}" for k, v in options.items())


# Buffers outside the state_dict (PyTorch's persistent=False) are allocated by a build but not
# checked against the file: a build may make at most this many elements of them.
MAX_UNSAVED_BUFFER_ELEMENTS = 2**24


def check_architecture(ckpt: export.Checkpoint, where: Path) -> tuple[str, int, tuple[int, ...], dict[str, Any]]:
    """Check that the architecture the metadata names has exactly the file's weights, without
    allocating it: ``(model, num_classes, input_shape, model_options)``, or a :class:`UserError`.

    The metadata's values are checked for type and range, then the model is built as a skeleton
    (:func:`probmask.app.models.build_skeleton`: large tensors on the meta device) and every
    state_dict key and shape is compared with the file's. After this, building the model for real
    allocates what the file's own tensors take. A builder that fails on the metadata's options
    (``TypeError``, ``ValueError``, ...) is a :class:`UserError` naming the file and the options.
    """
    from probmask.app.models import build_skeleton

    name, num_classes, input_shape, options = _model_spec(ckpt.meta, where)
    try:
        skeleton = build_skeleton(name, num_classes, input_shape, max_tensors=2 * len(ckpt.state_dict) + 64,
                                  **options)
    except UserError as err:
        raise UserError(f"{where}: cannot rebuild the model: {_first_line(err, 400)}") from None
    except Exception as err:  # the builder's own checks of crafted options: TypeError, ValueError, ...
        raise UserError(f"{where}: cannot rebuild {name} with num_classes={num_classes}, "
                        f"{_options_text(options)} from its metadata: {type(err).__name__}: {_first_line(err)}") from None
    own = skeleton.state_dict()
    mismatch = export.describe_mismatch(own, ckpt.state_dict)
    if mismatch:
        raise UserError(f"{where}: cannot rebuild the model: {name} with num_classes={num_classes}, "
                        f"{_options_text(options)} does not fit the file's weights: {mismatch}")
    unsaved = sum(b.numel() for k, b in skeleton.named_buffers() if k not in own)
    if unsaved > MAX_UNSAVED_BUFFER_ELEMENTS:
        raise UserError(f"{where}: cannot rebuild the model: {name} with {_options_text(options)} makes "
                        f"{unsaved:,} elements of buffers that the file does not hold")
    return name, num_classes, input_shape, options


def rebuild(ckpt: export.Checkpoint, where: Path) -> nn.Module:
    """Build the architecture named in the metadata and load the weights into it (eval mode).

    The metadata is only used to rebuild the architecture, and checked with
    :func:`check_architecture` before anything is allocated; nothing else in it is acted upon.
    """
    from probmask.app.models import build_model, check_input

    name, num_classes, input_shape, options = check_architecture(ckpt, where)
    try:
        model = build_model(name, num_classes=num_classes, input_shape=input_shape, **options)
        export.load_into(model, ckpt)
        check_input(model, input_shape, name)
    except (UserError, export.CheckpointError) as err:
        raise UserError(f"{where}: cannot rebuild the model: {_first_line(err, 400)}") from None
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
