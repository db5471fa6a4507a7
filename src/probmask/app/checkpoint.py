"""Checkpoints of a run: what is saved at the end of every epoch, and how a run resumes from it.

``checkpoint.pt`` is written atomically (see :mod:`probmask.atomic_io`) at the end of every epoch
and after fixing the mask, so a kill never loses a finished epoch. It holds the model, method,
optimizer and scheduler states, every process's random-number state, the phase and the epochs of
that phase completed and the metrics so far, all loadable with ``torch.load(weights_only=True)``.
``run --resume DIR`` continues from it and ends with the same numbers as an uninterrupted run
(on the CPU, same seed).
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from probmask.app.config import ExperimentConfig, config_diff, config_from_dict, config_to_dict
from probmask.app.distributed import DistContext
from probmask.app.errors import UserError
from probmask.atomic_io import atomic_write_file

__all__ = ["VERSION", "fitting", "read", "restore_rng", "rng_state", "to_cpu", "write"]

log = logging.getLogger(__name__)

VERSION = 2
_LAYOUT = {"config": dict, "phase": str, "epoch": int, "model": dict, "method": dict, "optimizers": dict,
           "schedulers": dict, "history": list, "rng": dict}  # what a checkpoint holds, checked on reading


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random-number state: PyTorch's CPU generator, and CUDA's when used."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor in nested dicts, lists and tuples moved to the CPU."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def write(path: Path, cfg: ExperimentConfig, phase: str, epoch: int, state: Mapping[str, Any],
          dist: DistContext, device: torch.device) -> None:
    """Save ``state`` (model, method, optimizers, schedulers, history) with the config, the phase,
    ``epoch`` (epochs of that phase completed) and every rank's RNG state. A collective: every
    rank calls it; rank 0 writes."""
    ranks = dist.all_gather_object(rng_state(device)) if dist.enabled else None
    if not dist.is_main:
        return
    data = {"version": VERSION, "config": config_to_dict(cfg), "phase": phase, "epoch": epoch, **state,
            "rng": rng_state(device), "world_size": dist.world_size}
    if ranks is not None:
        data["rng_ranks"] = ranks
    atomic_write_file(path, lambda f: torch.save(data, f))


def read(path: Path, cfg: ExperimentConfig) -> dict[str, Any] | None:
    """The checkpoint's contents, checked against ``cfg`` (None without a checkpoint)."""
    if not path.exists():
        return None
    try:
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}; delete it to restart the run "
                        "from the beginning") from None
    if not zipped:  # PyTorch's legacy format would allocate the sizes it declares before reading
        raise UserError(f"{path} is not a checkpoint probmask wrote (not PyTorch's zip format, or damaged); "
                        "delete it to restart the run from the beginning")
    try:
        # on the CPU: RNG states must stay there; load_state_dict moves the rest to the device
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file: say which and what to do
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        if isinstance(err, pickle.UnpicklingError) and "weights only" in first.lower():
            # PyTorch's advice here (load it unsafely) is not ours to pass on
            raise UserError(f"cannot read {path}: it holds objects other than tensors and plain values, "
                            "which probmask does not load; delete it to restart the run from the beginning") from None
        if "weights_only" in first:
            first = "not a checkpoint probmask can load safely"
        raise UserError(f"cannot read {path} ({type(err).__name__}: {first}); "
                        "delete it to restart the run from the beginning") from None
    if not isinstance(state, dict) or state.get("version") != VERSION:
        raise UserError(f"{path} is not a probmask run checkpoint of this version; "
                        "delete it to restart the run from the beginning")
    bad = [key for key, kind in _LAYOUT.items() if not isinstance(state.get(key), kind)]
    if not bad and (state["phase"] not in ("main", "finetune") or state["epoch"] < 0):
        bad = ["phase", "epoch"]
    plain = (str, int, float, bool, type(None))
    if not bad and not all(isinstance(h, dict) and all(isinstance(v, plain) for v in h.values())
                           for h in state["history"]):
        bad = ["history"]
    if bad:
        raise UserError(f"{path} is damaged ({', '.join(bad)} missing or invalid); "
                        "delete it to restart the run from the beginning")
    saved = config_from_dict(state["config"], where=f"{path}")
    diff = config_diff(saved, cfg)
    if diff:
        shown = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, a, b in diff[:4])
        raise UserError(f"{path.parent} was run with a different config ({shown}); "
                        "resume it with its own config or start a new run with --out")
    return state


@contextmanager
def fitting(path: Path) -> Iterator[None]:
    """Around loading a checkpoint's states into the run: a state that does not fit (other shapes,
    keys or sizes) is a :class:`UserError` naming the file."""
    try:
        yield
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise UserError(f"{path} does not fit this run ({type(err).__name__}: {first}); "
                        "delete it to restart the run from the beginning") from None


def restore_rng(state: Mapping[str, Any], dist: DistContext, device: torch.device) -> None:
    """This rank's random streams as saved; with another number of processes only rank 0's."""
    saved_world = int(state.get("world_size", 1))
    ranks = state.get("rng_ranks")
    if saved_world != dist.world_size and dist.is_main:
        log.warning("resuming a run of %d process(es) with %d: the mask noise differs from an "
                    "uninterrupted run", saved_world, dist.world_size)
    if ranks is not None and len(ranks) == dist.world_size:
        _set_rng_state(ranks[dist.rank], device)
    elif dist.is_main:
        _set_rng_state(state["rng"], device)
