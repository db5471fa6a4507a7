"""The run directory's life: choosing it, refusing one that would lose results, creating it, and
telling an interrupted run from one that never started.

probmask never overwrites a run: a new run goes only into a directory that does not exist yet or
holds none of the files a run writes (:data:`OWNED`). Everything here checks before anything is
created, so a refused run leaves the disk as it was; a run that fails before writing anything
removes the folders it created.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from probmask.app.artifacts import CONFIG, RUN_FILES
from probmask.app.errors import UserError

__all__ = ["OWNED", "check_new", "create", "default", "remove_if_empty", "remove_stale_temporaries", "resumable"]

OWNED = (*RUN_FILES, "tensorboard", "export")  # what a run (and ``probmask export``) writes into it


def default(cfg: Any) -> Path:
    """``runs/<model>-<data>-<sparsity>-<time>``, with a numeric suffix if that exists already."""
    name = cfg.model.name.replace("torchvision:", "")
    base = Path("runs") / f"{name}-{cfg.data.name}-{cfg.prune.sparsity:g}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists() or path.is_symlink():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _writable_folder(path: Path, what: str) -> None:
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path} is not writable: check its permissions or choose another --out")


def check_new(run_dir: Path) -> None:
    """Refuse ``run_dir`` for a new run unless it is new or holds no run file, and unless the run
    can create and write it. Creates nothing."""
    if run_dir.is_symlink() and not run_dir.exists():
        raise UserError(f"{run_dir} is a broken symbolic link: choose another --out")
    if run_dir.exists():
        if not run_dir.is_dir():
            raise UserError(f"{run_dir} exists and is not a directory: choose another --out "
                            "(a run writes a directory of files)")
        found = sorted(name for name in OWNED if (run_dir / name).exists() or (run_dir / name).is_symlink())
        if found:
            if (run_dir / CONFIG).is_file():
                raise UserError(f"{run_dir} already holds a run: continue it with --resume {run_dir}, "
                                "or choose another --out")
            raise UserError(f"{run_dir} already holds run files ({', '.join(found)}) that a new run would "
                            "overwrite: choose another --out")
        _writable_folder(run_dir, "the run directory")
        return
    parent = run_dir.parent
    while not parent.exists() and parent != parent.parent:
        if parent.is_symlink():
            raise UserError(f"{parent} is a broken symbolic link: choose another --out")
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"cannot create {run_dir}: {parent} is a file, not a folder; choose another --out")
    _writable_folder(parent, "the folder")


def create(run_dir: Path) -> list[Path]:
    """Create ``run_dir`` and its missing parents; returns the folders created, outermost first
    (:func:`remove_if_empty` takes them away again if the run never wrote anything)."""
    missing = []
    path = run_dir
    while not path.exists():
        missing.append(path)
        path = path.parent
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the run directory {run_dir}: {err.strerror or err}; "
                        "choose another --out") from None
    return missing[::-1]


def remove_if_empty(created: list[Path]) -> None:
    """Remove the folders :func:`create` made, innermost first, as long as they are empty."""
    for path in reversed(created):
        try:
            path.rmdir()
        except OSError:
            return


def remove_stale_temporaries(run_dir: Path) -> None:
    """Delete the half-written temporaries a killed run left behind (only those of run files)."""
    for name in RUN_FILES:
        for stale in run_dir.glob(f".{name}.*.tmp"):
            stale.unlink()


def resumable(run_dir: Path | None) -> bool:
    """Whether ``probmask run --resume run_dir`` can continue a run there."""
    return run_dir is not None and (run_dir / CONFIG).is_file()
