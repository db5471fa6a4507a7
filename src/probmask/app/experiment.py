"""One experiment: a configuration in, a run directory out (see :mod:`probmask.app.artifacts`).

Phases: the main phase trains weights (SGD, momentum, cosine decay) and the method's scores
(Adam, cosine decay) together, with ``train.samples`` mask samples per minibatch, the joint
gradient norm clipped to ``train.grad_clip``, the method's ``step()`` (ProbMask: the projection)
after every optimizer step and its schedules moved once per epoch; every epoch ends with a test
pass using hard masks. Then the mask is fixed, the weights are finetuned under it, and the model
is finalized. A checkpoint after every epoch lets ``--resume`` continue where a run stopped.

Under ``torchrun --nproc_per_node=N -m probmask run ...`` the same runs on N processes (see
:mod:`probmask.app.training` and :mod:`probmask.app.distributed`): ``train.batch_size`` is the
global batch, the scores stay identical on every rank after every step, the fixed mask and a
resumed checkpoint come from rank 0, and rank 0 alone logs and writes the run directory.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from probmask.app import artifacts, checkpoint, rundir
from probmask.app.config import ExperimentConfig, config_to_dict, config_to_yaml, validate
from probmask.app.data import DataSplits, load_data
from probmask.app.distributed import DistContext
from probmask.app.errors import UserError
from probmask.app.methods import METHODS, build_method
from probmask.app.models import build_model, check_input, check_model_name, parameter_roles
from probmask.app.training import Loaders, Loop, Optimizers, finetune_optimizers, main_optimizers
from probmask.atomic_io import atomic_write_file
from probmask.report import Report

__all__ = ["Experiment", "RunResult", "model_options", "resolve_device", "run_experiment"]

log = logging.getLogger(__name__)

EpochHook = Callable[[dict[str, Any]], None]


@dataclass
class RunResult:
    run_dir: Path
    results: dict[str, Any]
    report: Report  # per-layer counts recounted from the finalized weights


def resolve_device(name: str, dist: DistContext | None = None) -> torch.device:
    """``auto``: CUDA when present, else CPU; with several processes each takes its LOCAL_RANK's GPU.
    Asking for a CUDA device that does not exist is a :class:`UserError`."""
    dist = dist if dist is not None else DistContext()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else torch.device(name)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise UserError(f"device={name} but no CUDA device is available here: use device=cpu or auto")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise UserError(f"device={name} but only {count} CUDA device(s) exist")
    if dist.enabled:
        if device.index is not None:
            raise UserError(f"device={name} with {dist.world_size} processes: use device=auto "
                            "or cuda (each process takes the GPU of its LOCAL_RANK)")
        if dist.local_rank >= count:
            raise UserError(f"LOCAL_RANK {dist.local_rank} but only {count} CUDA device(s) exist: "
                            "start at most one process per GPU")
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    return device


def model_options(cfg: ExperimentConfig) -> dict[str, Any]:
    """Keyword options of the model builder: ``model.options`` plus ``model.width`` when set."""
    options = dict(cfg.model.options)
    if cfg.model.width is not None:
        options["width"] = cfg.model.width
    return options


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically unless the file holds it already (a resume leaves it untouched)."""
    try:
        if path.read_text() == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    atomic_write_file(path, lambda f: f.write(text), mode="w")


class Experiment:
    """One run: builds data, model and method from the config and drives the phases.

    ``progress`` shows a tqdm bar per epoch; ``on_epoch_end`` is called with each epoch's metrics
    after its checkpoint is written (an extension point; raising from it stops the run there).
    ``dist`` places this process among several (``torchrun``); the hook runs on every process.
    """

    def __init__(self, cfg: ExperimentConfig, run_dir: str | Path, *, progress: bool = False,
                 on_epoch_end: EpochHook | None = None, dist: DistContext | None = None) -> None:
        validate(cfg)
        METHODS.get(cfg.prune.method)  # unknown names fail before any data is read
        check_model_name(cfg.model.name)
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.dist = dist if dist is not None else DistContext()
        self.device = resolve_device(cfg.device, self.dist)
        self.on_epoch_end = on_epoch_end
        torch.manual_seed(cfg.seed)  # the same model (and method) on every rank
        self.data: DataSplits = load_data(cfg.data)
        self.options = model_options(cfg)
        model = build_model(cfg.model.name, self.data.num_classes, self.data.input_shape, **self.options)
        check_input(model, self.data.input_shape, cfg.model.name)
        self.model = model.to(self.device)
        self.method = build_method(self.model, cfg.prune)
        if self.dist.rank > 0:  # each rank draws its own mask noise
            torch.manual_seed(cfg.seed + 1_000_003 * self.dist.rank)
        self.loaders = Loaders.build(self.data, cfg.train.batch_size, cfg.data, self.dist, self.device)
        self.loop = Loop(self.model, self.method, device=self.device, dist=self.dist, bf16=cfg.bf16,
                         grad_clip=cfg.train.grad_clip, progress=progress)
        self.history: list[dict[str, Any]] = []
        self._writer: Any = None

    @property
    def _checkpoint_path(self) -> Path:
        return self.run_dir / artifacts.CHECKPOINT

    # ------------------------------------------------------------------ records
    def _record(self, record: dict[str, Any], num_epochs: int) -> None:
        self.history.append(record)
        if not self.dist.is_main:
            return
        path = self.run_dir / artifacts.METRICS
        try:
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:  # name the file; a resume rewrites it from the checkpoint
            raise OSError(err.errno, err.strerror, str(path)) from err
        if self._writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self._writer.add_scalar(f"{record['phase']}/{key}", value, len(self.history))
        keep = f"keep {100 * record['density']:.2f}%" if record.get("density") is not None else ""
        if record.get("budget") is not None:
            keep += f" (budget {100 * record['budget']:.2f}%)"
        temp = f"  T {record['temperature']:.1f}" if record.get("temperature") is not None else ""
        log.info("%-8s epoch %*d/%d  loss %.4f  train %6.2f%%  test %6.2f%%  %s%s  %.1fs",
                 record["phase"], len(str(num_epochs)), record["epoch"] + 1, num_epochs, record["train_loss"],
                 record["train_acc"], record["test_acc"], keep, temp, record["time_s"])

    def _rewrite_metrics(self) -> None:
        if self.dist.is_main:
            _write_text(self.run_dir / artifacts.METRICS, "".join(json.dumps(h) + "\n" for h in self.history))

    def _open_tensorboard(self) -> None:
        if not self.cfg.tensorboard or not self.dist.is_main:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("tensorboard=true but the tensorboard package is not installed: no TensorBoard logs")
            return
        self._writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def _checkpoint(self, phase: str, epoch: int, optimizers: Optimizers) -> None:
        opts, scheds = optimizers
        state = {"model": self.model.state_dict(), "method": self.method.state_dict(),
                 "optimizers": {k: o.state_dict() for k, o in opts.items()},
                 "schedulers": {k: s.state_dict() for k, s in scheds.items()}, "history": self.history}
        checkpoint.write(self._checkpoint_path, self.cfg, phase, epoch, state, self.dist, self.device)

    # ------------------------------------------------------------------ phases
    def _epochs(self, phase: str, start: int, num_epochs: int, optimizers: Optimizers, samples: int) -> None:
        opts, scheds = optimizers
        for epoch in range(start, num_epochs):
            begin = time.perf_counter()
            if phase == "main":
                self.method.set_epoch(epoch, num_epochs)
            schedule = self.method.stats() if phase == "main" else {}
            lrs = {k: o.param_groups[0]["lr"] for k, o in opts.items()}
            self.loaders.seed_epoch(self.cfg.seed, phase, epoch)
            train = self.loop.train_epoch(self.loaders.train, opts, scheds, samples,
                                          f"{phase} {epoch + 1}/{num_epochs}")
            if self.dist.enabled:
                # batch-norm statistics follow each rank's own batches: take rank 0's
                self.dist.broadcast_(list(self.model.buffers()))
                self.dist.assert_same([*self.model.parameters(), *self.method.score_parameters()],
                                      f"after {phase} epoch {epoch + 1} the parameters and scores")
            test_loss, test_acc = self.loop.evaluate(self.model, self.loaders.test, "test")
            stats = self.method.stats()
            record = {"phase": phase, "epoch": epoch, **train, "test_loss": test_loss, "test_acc": test_acc,
                      "budget": schedule.get("budget"), "temperature": schedule.get("temperature"),
                      "density": stats.get("density"), "lr": lrs.get("weights"), "score_lr": lrs.get("scores"),
                      "time_s": time.perf_counter() - begin}
            self._record(record, num_epochs)
            self._checkpoint(phase, epoch + 1, optimizers)
            if self.on_epoch_end is not None:
                self.on_epoch_end(record)

    def _restore(self, optimizers: Optimizers, state: Mapping[str, Any] | None) -> Optimizers:
        if state is not None and state["optimizers"]:
            with checkpoint.fitting(self._checkpoint_path):
                for k, o in optimizers[0].items():
                    o.load_state_dict(state["optimizers"][k])
                for k, s in optimizers[1].items():
                    s.load_state_dict(state["schedulers"][k])
        return optimizers

    def _fix_mask(self) -> None:
        p = self.cfg.prune
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed + 1)

        def score() -> float:
            return self.loop.evaluate(self.model, self.loaders.train_eval, "scoring mask", p.fix_batches)[1]

        begin = time.perf_counter()
        self.method.fix_mask(score_fn=score, generator=generator)  # every rank (score() is a collective)
        if self.dist.enabled:  # rank 0's decision is the one kept, whatever a method does
            state = self.dist.broadcast_object(checkpoint.to_cpu(self.method.state_dict()) if self.dist.is_main else None)
            if not self.dist.is_main:
                self.method.load_state_dict(state)
            self.dist.broadcast_([*self.model.parameters(), *self.model.buffers()])
        if self.dist.is_main:
            how = "top-k by score" if p.fix == "topk" else f"best of {p.fix_samples} samples by training accuracy"
            log.info("fixed the mask (%s) in %.1fs", how, time.perf_counter() - begin)
        self._checkpoint("finetune", 0, ({}, {}))

    def _finish(self) -> RunResult:
        method_report = self.method.report()
        floors = {layer.name: layer.floor for layer in method_report.layers}
        binding = {layer.name: layer.floor_binding for layer in method_report.layers}
        masks = self.method.masks()
        roles = parameter_roles(self.model, list(masks))  # empty unless the model declares roles
        model = self.method.finalize()
        recount = Report.count_nonzero({name: model.get_parameter(name) for name in masks}, floors, binding)
        report = Report(recount.layers, fixed=True, target_kept=method_report.target_kept).with_roles(roles)
        test_loss, test_acc = self.loop.evaluate(model, self.loaders.test, "final test")
        cfg = self.cfg
        results = {
            "test_accuracy": test_acc, "test_loss": test_loss, "sparsity": report.sparsity,
            "kept": int(report.kept), "total": report.total, "target_kept": report.target_kept,
            "layers": report.summaries(),  # each with its "role" when the model declares roles
            **({"roles": [group.summary() for group in report.role_groups()]} if roles else {}),
            "model": cfg.model.name, "data": cfg.data.name, "method": cfg.prune.method,
            "target_sparsity": cfg.prune.sparsity,
            "epochs": {"main": cfg.train.epochs, "finetune": sum(h["phase"] == "finetune" for h in self.history)},
            "train_time_s": sum(h["time_s"] for h in self.history),
            "device": str(self.device), "processes": self.dist.world_size, "seed": cfg.seed,
        }
        meta = {"model": cfg.model.name, "model_options": self.options, "num_classes": self.data.num_classes,
                "input_shape": list(self.data.input_shape), "data": cfg.data.name, "method": cfg.prune.method,
                "test_accuracy": test_acc, "config": config_to_dict(cfg)}
        if self.dist.is_main:
            title = f"{cfg.model.name} on {cfg.data.name}, sparsity {100 * report.sparsity:.2f}%"
            artifacts.write_outputs(self.run_dir, model, masks, meta, results, self.history, title)
        self.dist.barrier()  # on every rank, the outputs exist once run() returns
        return RunResult(self.run_dir, results, report)

    def run(self, resume: bool = False) -> RunResult:
        """Run (or with ``resume``, continue from ``checkpoint.pt``) to the end; returns the results."""
        main = self.dist.is_main
        if main:
            if not resume:
                rundir.check_new(self.run_dir)  # never overwrite an earlier run's files
            self.run_dir.mkdir(parents=True, exist_ok=True)
            rundir.remove_stale_temporaries(self.run_dir)
        state = self.dist.on_main(lambda: checkpoint.read(self._checkpoint_path, self.cfg)) if resume else None
        if state is not None:
            with checkpoint.fitting(self._checkpoint_path):
                self.model.load_state_dict(state["model"])
                self.method.load_state_dict(state["method"])
            self.history = list(state["history"])
            if main:
                log.info("resuming %s: %s phase after %d epoch(s)", self.run_dir, state["phase"], state["epoch"])
        if main:
            _write_text(self.run_dir / artifacts.CONFIG, config_to_yaml(self.cfg))
        self._rewrite_metrics()
        phase, start = ("main", 0) if state is None else (state["phase"], int(state["epoch"]))
        if state is not None:
            with checkpoint.fitting(self._checkpoint_path):  # last: building everything drew random numbers
                checkpoint.restore_rng(state, self.dist, self.device)
        threads = torch.get_num_threads()
        if self.cfg.threads is not None:
            torch.set_num_threads(self.cfg.threads)
        if main:
            procs = f", {self.dist.world_size} processes" if self.dist.enabled else ""
            log.info("run directory %s; %s on %s (%s), device %s%s, %d CPU thread(s)", self.run_dir,
                     self.cfg.model.name, self.cfg.data.name, self.cfg.prune.method, self.device, procs,
                     torch.get_num_threads())
        self._open_tensorboard()
        self.loop.wrap(self.cfg.compile)
        try:
            t, f = self.cfg.train, self.cfg.finetune
            steps = len(self.loaders.train)
            if phase == "main":
                opts = self._restore(main_optimizers(self.method, t, t.epochs * steps, self.device), state)
                self._epochs("main", start, t.epochs, opts, t.samples)
                state, start = None, 0
            if self.method.fixed_mask is None:
                self._fix_mask()
            epochs = f.epochs if self.method.finetunes else 0
            if f.epochs and not self.method.finetunes:
                log.info("no finetuning: prune.method=%s with these settings trains no weights", self.cfg.prune.method)
            if start < epochs:
                opts = self._restore(finetune_optimizers(self.method, f, epochs * steps, self.device), state)
                self._epochs("finetune", start, epochs, opts, 1)
            return self._finish()
        finally:
            torch.set_num_threads(threads)
            self.loop.unwrap()
            if self._writer is not None:
                self._writer.close()


def run_experiment(cfg: ExperimentConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = False,
                   on_epoch_end: EpochHook | None = None, dist: DistContext | None = None) -> RunResult:
    """Build the experiment for ``cfg`` and run it into ``run_dir``; ``dist``: this process's place
    among several (:class:`probmask.app.distributed.DistContext`)."""
    return Experiment(cfg, run_dir, progress=progress, on_epoch_end=on_epoch_end, dist=dist).run(resume=resume)
