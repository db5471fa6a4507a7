"""The experiment runner: a configuration in, a run directory out.

Phases: the main phase trains weights (SGD, momentum, cosine decay) and the method's scores
(Adam, cosine decay) together, with ``train.samples`` mask samples per minibatch, the joint
gradient norm clipped to ``train.grad_clip``, the method's projection after every step and its
schedules moved once per epoch; every epoch ends with a test pass using hard sampled masks.
Then the mask is fixed, the weights are finetuned under it, and the model is finalized.

Under ``torchrun --nproc_per_node=N -m probmask run ...`` the same runs on N processes with
``DistributedDataParallel`` (see :class:`Experiment` and :mod:`probmask.app.distributed`):
``train.batch_size`` is the global batch, the scores stay identical on every rank after every
step, and rank 0 alone writes the run directory below.

A run directory holds:

* ``config.yaml`` -- the resolved configuration;
* ``metrics.jsonl`` -- one JSON object per epoch: ``phase`` (main / finetune), ``epoch``,
  ``train_loss``, ``train_acc``, ``test_loss``, ``test_acc`` (percent), ``budget`` (keep ratio),
  ``temperature``, ``density`` (expected kept fraction from the scores; exact once fixed),
  ``lr``, ``score_lr``, ``time_s``;
* ``checkpoint.pt`` -- written atomically at the end of every epoch and after fixing the mask;
  ``run --resume DIR`` continues from it and ends with the same numbers as an uninterrupted run
  (on CPU, same seed): it holds the model, method, optimizer and scheduler states, the RNG state,
  the phase and epoch and the metrics so far, all loadable with ``torch.load(weights_only=True)``;
* ``results.json`` -- ``test_accuracy`` (percent, the finalized model on the test set),
  ``sparsity`` / ``kept`` / ``total`` (recounted from the finalized weights: zeros among the
  prunable weights), ``layers`` (``{name, shape, numel, kept, density}`` each) and run facts;
* ``model.pt`` -- the finalized plain model, see :func:`save_model`;
* ``layer_density.png`` and ``training.png``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from probmask import export
from probmask.app.config import (
    ExperimentConfig,
    config_diff,
    config_from_dict,
    config_to_dict,
    config_to_yaml,
    validate,
)
from probmask.app.data import DataSplits, load_data
from probmask.app.distributed import DistContext, ShardSampler
from probmask.app.errors import UserError
from probmask.app.methods import Method, build_method, method_class
from probmask.app.models import build_model, check_input, check_model_name
from probmask.app.plots import plot_layer_density, plot_training
from probmask.atomic_io import atomic_write_file
from probmask.report import LayerReport, Report

__all__ = [
    "CHECKPOINT",
    "CONFIG",
    "METRICS",
    "MODEL",
    "RESULTS",
    "Experiment",
    "RunResult",
    "load_model",
    "model_options",
    "resolve_device",
    "run_experiment",
    "save_model",
]

log = logging.getLogger(__name__)

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"
RESULTS = "results.json"
MODEL = "model.pt"
LAYER_PLOT = "layer_density.png"
TRAINING_PLOT = "training.png"
_CHECKPOINT_VERSION = 1

EpochHook = Callable[[dict[str, Any]], None]


@dataclass
class RunResult:
    run_dir: Path
    results: dict[str, Any]
    report: Report  # per-layer counts recounted from the finalized weights


# ---------------------------------------------------------------------------------- helpers
def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when present, else CPU. Asking for CUDA without it is a :class:`UserError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device={name} but no CUDA device is available here: use device=cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device={name} but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def model_options(cfg: ExperimentConfig) -> dict[str, Any]:
    """Keyword options of the model builder: ``model.options`` plus ``model.width`` when set."""
    options = dict(cfg.model.options)
    if cfg.model.width is not None:
        options["width"] = cfg.model.width
    return options


def _write_json(path: Path, data: Any) -> None:
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

    Rebuild with ``probmask.app.models.build_model(meta["model"], meta["num_classes"],
    meta["input_shape"], **meta["model_options"])`` and ``load_state_dict`` (or :func:`load_model`).
    """
    export.save_pt(export.Checkpoint(model.state_dict(), dict(masks), dict(meta)), path)


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Tensor], dict[str, Any]]:
    """Rebuild the model saved by :func:`save_model`: ``(model in eval mode, masks, meta)``."""
    ckpt = export.load(path)
    meta = ckpt.meta
    model = build_model(meta["model"], meta["num_classes"], meta["input_shape"], **meta["model_options"])
    export.load_into(model, ckpt)
    return model.eval(), ckpt.masks, meta


def _recount(model: nn.Module, masks: Mapping[str, Tensor], method_layers: Mapping[str, LayerReport]) -> Report:
    """Per-layer nonzero counts of the finalized weights (what the saved model really keeps);
    floors come from the method's own report."""
    layers = []
    for name in masks:
        weight = model.get_parameter(name).detach()
        src = method_layers.get(name)
        layers.append(LayerReport(
            name, tuple(weight.shape), weight.numel(), float(torch.count_nonzero(weight)),
            src.floor if src else 0, bool(src.floor_binding) if src else False,
        ))
    target = sum(int(m.sum()) for m in masks.values())
    return Report(layers, fixed=True, target_kept=target)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor in nested dicts, lists and tuples moved to the CPU."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


# ---------------------------------------------------------------------------------- the experiment
class Experiment:
    """One run: builds data, model and method from the config and drives the phases.

    ``progress`` shows a tqdm bar per epoch; ``on_epoch_end`` is called with each epoch's metrics
    after its checkpoint is written (an extension point; raising from it stops the run there).

    ``dist`` places this process among several (``torchrun``; see :mod:`probmask.app.distributed`):
    ``train.batch_size`` is then the global batch, split evenly across the processes; the
    module's trainable parameters are wrapped in ``DistributedDataParallel`` and the method's
    other parameters (its scores) get their gradients averaged, so every process takes the same
    step; metrics are summed across processes; the fixed mask and a resumed checkpoint come from
    rank 0; only rank 0 writes files and logs epochs. The hook runs on every process.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        run_dir: str | Path,
        *,
        progress: bool = False,
        on_epoch_end: EpochHook | None = None,
        dist: DistContext | None = None,
    ) -> None:
        validate(cfg)
        method_class(cfg.prune.method)  # unknown names fail before any data is read
        check_model_name(cfg.model.name)
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.dist = dist if dist is not None else DistContext()
        self.device = self._resolve_device()
        self.progress = progress and self.dist.is_main
        self.on_epoch_end = on_epoch_end
        self.bf16 = cfg.bf16  # autocast on CUDA and on the CPU; scores and projection stay float32
        world = self.dist.world_size
        if cfg.train.batch_size % world:
            raise UserError(f"train.batch_size={cfg.train.batch_size} is the global batch and must be divisible "
                            f"by the number of processes ({world})")

        torch.manual_seed(cfg.seed)  # the same model (and method) on every rank
        self.data: DataSplits = load_data(cfg.data)
        self.options = model_options(cfg)
        model = build_model(cfg.model.name, self.data.num_classes, self.data.input_shape, **self.options)
        check_input(model, self.data.input_shape, cfg.model.name)
        self.model = model.to(self.device)
        self.method: Method = build_method(self.model, cfg.prune)
        if self.dist.rank > 0:  # each rank draws its own mask noise
            torch.manual_seed(cfg.seed + 1_000_003 * self.dist.rank)
        self._ddp: DistributedDataParallel | None = None
        self._compiled: nn.Module | None = None  # with cfg.compile: the training forward

        self._loader_generator = torch.Generator()
        self._sampler: DistributedSampler | None = None
        workers = cfg.data.num_workers
        common: dict[str, Any] = {"num_workers": workers, "pin_memory": self.device.type == "cuda"}
        batch = cfg.train.batch_size // world  # per process
        if self.dist.enabled:
            rank = self.dist.rank
            self._sampler = DistributedSampler(self.data.train, num_replicas=world, rank=rank, shuffle=True, seed=0)
            self.train_loader = DataLoader(
                self.data.train, batch_size=batch, sampler=self._sampler,
                drop_last=len(self._sampler) > batch, persistent_workers=workers > 0, **common,
            )
            test_shard = ShardSampler(len(self.data.test), rank, world)
            self.test_loader = DataLoader(self.data.test, batch_size=batch, sampler=test_shard,
                                          persistent_workers=workers > 0, **common)
            train_shard = ShardSampler(len(self.data.train_eval), rank, world)
            self.train_eval_loader = DataLoader(self.data.train_eval, batch_size=batch, sampler=train_shard, **common)
        else:
            self.train_loader = DataLoader(
                self.data.train, batch_size=batch, shuffle=True, generator=self._loader_generator,
                drop_last=len(self.data.train) > batch, persistent_workers=workers > 0, **common,
            )
            self.test_loader = DataLoader(self.data.test, batch_size=batch, persistent_workers=workers > 0, **common)
            self.train_eval_loader = DataLoader(self.data.train_eval, batch_size=batch, **common)  # used once
        self.history: list[dict[str, Any]] = []
        self._writer: Any = None

    def _resolve_device(self) -> torch.device:
        device = resolve_device(self.cfg.device)
        if self.dist.enabled and device.type == "cuda":
            if device.index is not None:
                raise UserError(f"device={self.cfg.device} with {self.dist.world_size} processes: use device=auto "
                                "or cuda (each process takes the GPU of its LOCAL_RANK)")
            if self.dist.local_rank >= torch.cuda.device_count():
                raise UserError(f"LOCAL_RANK {self.dist.local_rank} but only {torch.cuda.device_count()} CUDA "
                                "device(s) exist: start at most one process per GPU")
            device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(device)
        return device

    # ------------------------------------------------------------------ loops
    def _autocast(self) -> Any:
        """bfloat16 autocast of the forward pass (matrix products and convolutions in bf16); the
        parameters, the scores, their gradients and the projection stay in float32."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    @property
    def _net(self) -> nn.Module:
        """The module the training forward passes go through (DDP-wrapped with several processes,
        compiled with ``compile``); evaluation uses the plain model."""
        if self._compiled is not None:
            return self._compiled
        return self._ddp if self._ddp is not None else self.model

    def _sum(self, *values: Tensor | float) -> list[float]:
        """The values summed over all processes (as they are with one)."""
        if not self.dist.enabled:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        return self.dist.all_reduce_sum_(t).tolist()

    def _batches(self, loader: DataLoader, desc: str, max_batches: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        total = len(loader) if max_batches is None else min(max_batches, len(loader))
        bar = tqdm(loader, desc=desc, total=total, leave=False, dynamic_ncols=True,
                   disable=not self.progress, file=sys.stderr)
        try:
            for i, (x, y) in enumerate(bar):
                if i >= total:
                    break
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        finally:
            bar.close()

    def _seed_epoch(self, phase: str, epoch: int) -> None:
        """The shuffling order depends on (seed, phase, epoch) only, so a resumed run sees the same."""
        offset = 0 if phase == "main" else 1_000_000
        seed = self.cfg.seed * 10_000_019 + offset + epoch
        if self._sampler is not None:
            self._sampler.set_epoch(seed)  # its permutation is seeded with seed + epoch, here 0 + this
        else:
            self._loader_generator.manual_seed(seed)

    def _train_epoch(self, optimizers: Mapping[str, torch.optim.Optimizer],
                     schedulers: Mapping[str, Any], samples: int, desc: str) -> dict[str, float]:
        self.model.train()
        params = [p for opt in optimizers.values() for group in opt.param_groups for p in group["params"]]
        clip = self.cfg.train.grad_clip
        ddp = self._ddp
        in_ddp = [p for p in ddp.module.parameters() if p.requires_grad] if ddp is not None else []
        seen_ids = {id(p) for p in in_ddp}
        outside_ddp = [p for p in params if id(p) not in seen_ids]  # e.g. the scores: averaged below
        total_loss = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        seen = 0
        for x, y in self._batches(self.train_loader, desc):
            for opt in optimizers.values():
                opt.zero_grad(set_to_none=True)
            first: list[Tensor] = []
            calls = [0]

            def loss_fn(x: Tensor = x, y: Tensor = y, first: list[Tensor] = first, calls: list[int] = calls) -> Tensor:
                # DDP reduces the gradients in the backward of the samples-th pass (and any later
                # one); earlier passes only accumulate. Fewer passes: reduced after backward.
                calls[0] += 1
                sync = ddp is None or calls[0] >= samples
                with (nullcontext() if sync else ddp.no_sync()), self._autocast():  # type: ignore[union-attr]
                    out = self._net(x)
                    loss = F.cross_entropy(out.float(), y)
                if not first:
                    first.append(out.detach())
                return loss

            loss = self.method.backward(loss_fn, samples)
            if self.dist.enabled:  # identical gradients on every rank, so identical steps
                self.dist.average_gradients(outside_ddp + (in_ddp if calls[0] < samples else []))
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(params, clip)
            for opt in optimizers.values():
                opt.step()
            self.method.after_step()
            for sched in schedulers.values():
                sched.step()
            total_loss += loss.float() * y.numel()
            correct += (first[0].argmax(1) == y).sum()
            seen += y.numel()
        loss_sum, correct_sum, seen_sum = self._sum(total_loss, correct, seen)
        if seen_sum == 0:
            raise UserError("the training set is empty")
        return {"train_loss": loss_sum / seen_sum, "train_acc": 100.0 * correct_sum / seen_sum}

    @torch.no_grad()
    def _evaluate(self, model: nn.Module, loader: DataLoader, desc: str,
                  max_batches: int | None = None) -> tuple[float, float]:
        """(mean loss, accuracy in percent) in eval mode: hard masks, fixed or freshly sampled.

        With several processes each evaluates its shard of ``loader`` and the sums are combined,
        so every process returns the same numbers.
        """
        model.eval()
        total_loss = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        seen = 0
        for x, y in self._batches(loader, desc, max_batches):
            with self._autocast():
                out = model(x).float()
            total_loss += F.cross_entropy(out, y, reduction="sum")
            correct += (out.argmax(1) == y).sum()
            seen += y.numel()
        loss_sum, correct_sum, seen_sum = self._sum(total_loss, correct, seen)
        if seen_sum == 0:
            raise UserError("the test set is empty")
        return loss_sum / seen_sum, 100.0 * correct_sum / seen_sum

    # ------------------------------------------------------------------ optimizers per phase
    @property
    def _fused(self) -> bool | None:
        """Fused optimizer steps (one kernel over all parameters; on the CPU measured 2.3x faster for
        Adam on LeNet-300-100's scores) where PyTorch has them, else its default."""
        return True if self.device.type in ("cpu", "cuda") else None

    def _main_optimizers(self) -> tuple[dict[str, torch.optim.Optimizer], dict[str, Any]]:
        t = self.cfg.train
        opts: dict[str, torch.optim.Optimizer] = {}
        weights, scores = self.method.weight_parameters(), self.method.score_parameters()
        fused = self._fused
        if weights:
            opts["weights"] = torch.optim.SGD(weights, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                                              fused=fused)
        if scores:
            opts["scores"] = torch.optim.Adam(scores, lr=t.score_lr, weight_decay=0.0, fused=fused)
        steps = max(1, t.epochs * len(self.train_loader))
        return opts, {k: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=steps) for k, o in opts.items()}

    def _finetune_optimizers(self, epochs: int) -> tuple[dict[str, torch.optim.Optimizer], dict[str, Any]]:
        f = self.cfg.finetune
        opts: dict[str, torch.optim.Optimizer] = {}
        weights = self.method.weight_parameters()
        if weights:
            opts["weights"] = torch.optim.SGD(weights, lr=f.lr, momentum=f.momentum, weight_decay=f.weight_decay,
                                              fused=self._fused)
        steps = max(1, epochs * len(self.train_loader))
        return opts, {k: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=steps) for k, o in opts.items()}

    # ------------------------------------------------------------------ checkpoints and metrics
    def _save_checkpoint(self, phase: str, epoch: int, optimizers: Mapping[str, Any], schedulers: Mapping[str, Any]) -> None:
        """Rank 0 writes it; every rank's RNG state goes in (a collective: all ranks call this)."""
        rngs = self.dist.all_gather_object(_rng_state(self.device)) if self.dist.enabled else None
        if not self.dist.is_main:
            return
        state = {
            "version": _CHECKPOINT_VERSION,
            "config": config_to_dict(self.cfg),
            "phase": phase,
            "epoch": epoch,  # epochs of this phase completed
            "model": self.model.state_dict(),
            "method": self.method.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
            "rng": _rng_state(self.device),
            "history": self.history,
            "world_size": self.dist.world_size,
        }
        if rngs is not None:
            state["rng_ranks"] = rngs
        atomic_write_file(self.run_dir / CHECKPOINT, lambda f: torch.save(state, f))

    def _read_checkpoint(self) -> dict[str, Any] | None:
        """The checkpoint's contents, checked against this config (None without a checkpoint)."""
        path = self.run_dir / CHECKPOINT
        if not path.exists():
            return None
        try:
            # on the CPU: RNG states must stay there; load_state_dict moves the rest to the device
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # unreadable file: say which and what to do
            raise UserError(f"cannot read {path} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                            "delete it to restart the run from the beginning") from None
        if not isinstance(state, dict) or state.get("version") != _CHECKPOINT_VERSION:
            raise UserError(f"{path} is not a probmask run checkpoint of this version")
        saved = config_from_dict(state["config"], where=f"{path}")
        diff = config_diff(saved, self.cfg)
        if diff:
            shown = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, a, b in diff[:4])
            raise UserError(f"{self.run_dir} was run with a different config ({shown}); "
                            "resume it with its own config or start a new run with --out")
        return state

    def _load_checkpoint(self) -> dict[str, Any] | None:
        """Rank 0 reads ``checkpoint.pt`` and hands it to every rank (none reads a file another
        writes); all restore the model, the method and the history from it."""
        state = self.dist.on_main(self._read_checkpoint)
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.method.load_state_dict(state["method"])
            self.history = list(state["history"])
        return state

    def _restore_rng(self, state: Mapping[str, Any]) -> None:
        """This rank's random streams as saved; with another number of processes only rank 0's."""
        saved_world = int(state.get("world_size", 1))
        ranks = state.get("rng_ranks")
        if saved_world != self.dist.world_size and self.dist.is_main:
            log.warning("resuming a run of %d process(es) with %d: the mask noise differs from an "
                        "uninterrupted run", saved_world, self.dist.world_size)
        if ranks is not None and len(ranks) == self.dist.world_size:
            _set_rng_state(ranks[self.dist.rank], self.device)
        elif self.dist.is_main:
            _set_rng_state(state["rng"], self.device)

    @staticmethod
    def _restore_optimizers(state: Mapping[str, Any] | None, optimizers: Mapping[str, Any],
                            schedulers: Mapping[str, Any]) -> None:
        if state is None:
            return
        for k, o in optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        for k, s in schedulers.items():
            s.load_state_dict(state["schedulers"][k])

    def _rewrite_metrics(self) -> None:
        if not self.dist.is_main:
            return
        lines = "".join(json.dumps(h) + "\n" for h in self.history)
        atomic_write_file(self.run_dir / METRICS, lambda f: f.write(lines), mode="w")

    def _record(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if not self.dist.is_main:
            return
        with open(self.run_dir / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is not None:
            step = len(self.history)
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self._writer.add_scalar(f"{record['phase']}/{key}", value, step)

    def _log_epoch(self, r: dict[str, Any], num_epochs: int) -> None:
        if not self.dist.is_main:
            return
        keep = f"keep {100 * r['density']:.2f}%" if r.get("density") is not None else ""
        if r.get("budget") is not None:
            keep += f" (budget {100 * r['budget']:.2f}%)"
        temp = f"  T {r['temperature']:.1f}" if r.get("temperature") is not None else ""
        log.info(
            "%-8s epoch %*d/%d  loss %.4f  train %6.2f%%  test %6.2f%%  %s%s  %.1fs",
            r["phase"], len(str(num_epochs)), r["epoch"] + 1, num_epochs, r["train_loss"],
            r["train_acc"], r["test_acc"], keep, temp, r["time_s"],
        )

    def _open_tensorboard(self) -> None:
        if not self.cfg.tensorboard or not self.dist.is_main:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("tensorboard=true but the tensorboard package is not installed: no TensorBoard logs")
            return
        self._writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    # ------------------------------------------------------------------ phases
    def _epoch_end(self, phase: str, epoch: int, num_epochs: int, record: dict[str, Any],
                   optimizers: Mapping[str, Any], schedulers: Mapping[str, Any]) -> None:
        self._record(record)
        self._log_epoch(record, num_epochs)
        self._save_checkpoint(phase, epoch + 1, optimizers, schedulers)
        if self.on_epoch_end is not None:
            self.on_epoch_end(record)

    def _run_epoch(self, phase: str, epoch: int, num_epochs: int, optimizers: Mapping[str, Any],
                   schedulers: Mapping[str, Any], samples: int, schedule: dict[str, float]) -> dict[str, Any]:
        start = time.perf_counter()
        lrs = {k: o.param_groups[0]["lr"] for k, o in optimizers.items()}
        self._seed_epoch(phase, epoch)
        train = self._train_epoch(optimizers, schedulers, samples, f"{phase} {epoch + 1}/{num_epochs}")
        if self.dist.enabled:
            # batch-norm statistics follow each rank's own batches: take rank 0's
            self.dist.broadcast_(list(self.model.buffers()))
            self.dist.assert_same([*self.model.parameters(), *self.method.score_parameters()],
                                  f"after {phase} epoch {epoch + 1} the parameters and scores")
        test_loss, test_acc = self._evaluate(self.model, self.test_loader, "test")
        return {
            "phase": phase, "epoch": epoch, **train, "test_loss": test_loss, "test_acc": test_acc,
            "budget": schedule.get("budget"), "temperature": schedule.get("temperature"),
            **self.method.stats(), "lr": lrs.get("weights"), "score_lr": lrs.get("scores"),
            "time_s": time.perf_counter() - start,
        }

    def _main_phase(self, start: int, state: Mapping[str, Any] | None) -> None:
        epochs = self.cfg.train.epochs
        optimizers, schedulers = self._main_optimizers()
        self._restore_optimizers(state, optimizers, schedulers)
        for epoch in range(start, epochs):
            schedule = self.method.begin_epoch(epoch, epochs)
            record = self._run_epoch("main", epoch, epochs, optimizers, schedulers, self.cfg.train.samples, schedule)
            self._epoch_end("main", epoch, epochs, record, optimizers, schedulers)

    def _fix_mask(self) -> None:
        p = self.cfg.prune
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed + 1)
        train_eval = self.train_eval_loader

        def score() -> float:
            return self._evaluate(self.model, train_eval, "scoring mask", p.fix_batches)[1]

        begin = time.perf_counter()
        self.method.fix(score, generator)  # every rank, as score() is a collective; same result
        if self.dist.enabled:  # rank 0's decision is the one kept, whatever a method does
            method_state = self.dist.broadcast_object(_to_cpu(self.method.state_dict()) if self.dist.is_main else None)
            if not self.dist.is_main:
                self.method.load_state_dict(method_state)
            self.dist.broadcast_([*self.model.parameters(), *self.model.buffers()])
        how = "top-k by score" if p.fix == "topk" else f"best of {p.fix_samples} samples by training accuracy"
        if self.dist.is_main:
            log.info("fixed the mask (%s) in %.1fs", how, time.perf_counter() - begin)
        self._save_checkpoint("finetune", 0, {}, {})

    def _finetune_phase(self, start: int, state: Mapping[str, Any] | None) -> None:
        epochs = self.cfg.finetune.epochs if self.method.finetunes else 0
        if self.cfg.finetune.epochs and not self.method.finetunes:
            log.info("no finetuning: prune.method=%s with these settings trains no weights", self.cfg.prune.method)
        if start >= epochs:
            return
        optimizers, schedulers = self._finetune_optimizers(epochs)
        self._restore_optimizers(state if state and state["optimizers"] else None, optimizers, schedulers)
        for epoch in range(start, epochs):
            record = self._run_epoch("finetune", epoch, epochs, optimizers, schedulers, 1, {})
            self._epoch_end("finetune", epoch, epochs, record, optimizers, schedulers)

    def _finish(self) -> RunResult:
        method_report = {layer.name: layer for layer in self.method.report().layers}
        model, masks = self.method.finalize()
        report = _recount(model, masks, method_report)
        test_loss, test_acc = self._evaluate(model, self.test_loader, "final test")
        cfg = self.cfg
        results = {
            "test_accuracy": test_acc,
            "test_loss": test_loss,
            "sparsity": report.sparsity,
            "kept": int(report.kept),
            "total": report.total,
            "target_kept": report.target_kept,
            "layers": [
                {"name": lay.name, "shape": list(lay.shape), "numel": lay.numel, "kept": int(lay.kept),
                 "density": lay.density}
                for lay in report.layers
            ],
            "model": cfg.model.name,
            "data": cfg.data.name,
            "method": cfg.prune.method,
            "target_sparsity": cfg.prune.sparsity,
            "epochs": {"main": cfg.train.epochs, "finetune": sum(h["phase"] == "finetune" for h in self.history)},
            "train_time_s": sum(h["time_s"] for h in self.history),
            "device": str(self.device),
            "processes": self.dist.world_size,
            "seed": cfg.seed,
        }
        meta = {
            "model": cfg.model.name, "model_options": self.options, "num_classes": self.data.num_classes,
            "input_shape": list(self.data.input_shape), "data": cfg.data.name, "method": cfg.prune.method,
            "test_accuracy": test_acc, "config": config_to_dict(cfg),
        }
        if self.dist.is_main:
            save_model(self.run_dir / MODEL, model, masks, meta)
            title = f"{cfg.model.name} on {cfg.data.name}, sparsity {100 * report.sparsity:.2f}%"
            plot_layer_density(results["layers"], self.run_dir / LAYER_PLOT, title=f"kept weights per layer: {title}")
            plot_training(self.history, self.run_dir / TRAINING_PLOT, title=title)
            _write_json(self.run_dir / RESULTS, results)  # last: its presence means the run is complete
        self.dist.barrier()  # on every rank, the outputs exist once run() returns
        return RunResult(self.run_dir, results, report)

    def _wrap(self) -> None:
        """Several processes: the same start everywhere, and DDP around the trainable module;
        ``compile``: torch.compile around that."""
        self._wrap_ddp()
        if self.cfg.compile:
            self._compiled = torch.compile(self._ddp if self._ddp is not None else self.model)

    def _wrap_ddp(self) -> None:
        if not self.dist.enabled:
            return
        self.dist.broadcast_(self.method.score_parameters())
        if any(p.requires_grad for p in self.model.parameters()):
            ids = [self.device.index] if self.device.type == "cuda" else None
            self._ddp = DistributedDataParallel(self.model, device_ids=ids)  # broadcasts rank 0's state
        else:  # supermask mode: nothing in the module trains
            self.dist.broadcast_([*self.model.parameters(), *self.model.buffers()])

    def run(self, resume: bool = False) -> RunResult:
        """Run (or with ``resume``, continue from ``checkpoint.pt``) to the end; returns the results."""
        main = self.dist.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for stale in self.run_dir.glob(".*.tmp"):  # half-written files of a killed run
                stale.unlink()
        state = self._load_checkpoint() if resume else None
        if state is not None and main:
            log.info("resuming %s: %s phase after %d epoch(s)", self.run_dir, state["phase"], state["epoch"])
        if main:
            atomic_write_file(self.run_dir / CONFIG, lambda f: f.write(config_to_yaml(self.cfg)), mode="w")
        self._rewrite_metrics()
        phase, start = ("main", 0) if state is None else (state["phase"], int(state["epoch"]))
        if state is not None:
            self._restore_rng(state)  # last: building everything above drew random numbers
        threads = torch.get_num_threads()
        if self.cfg.threads is not None:
            torch.set_num_threads(self.cfg.threads)
        if main:
            procs = f", {self.dist.world_size} processes" if self.dist.enabled else ""
            log.info("run directory %s; %s on %s (%s), device %s%s, %d CPU thread(s)", self.run_dir,
                     self.cfg.model.name, self.cfg.data.name, self.cfg.prune.method, self.device, procs,
                     torch.get_num_threads())
        self._open_tensorboard()
        self._wrap()
        try:
            if phase == "main":
                self._main_phase(start, state)
                state, start = None, 0
            if not self.method.fixed:
                self._fix_mask()
            self._finetune_phase(start, state if phase == "finetune" else None)
            return self._finish()
        finally:
            torch.set_num_threads(threads)
            self._ddp = self._compiled = None
            if self._writer is not None:
                self._writer.close()


def run_experiment(cfg: ExperimentConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = False,
                   on_epoch_end: EpochHook | None = None, dist: DistContext | None = None) -> RunResult:
    """Build the experiment for ``cfg`` and run it into ``run_dir`` (see the module docstring);
    ``dist``: this process's place among several (:class:`probmask.app.distributed.DistContext`)."""
    return Experiment(cfg, run_dir, progress=progress, on_epoch_end=on_epoch_end, dist=dist).run(resume=resume)
