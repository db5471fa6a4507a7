"""Writing files atomically: readers see the old file or the complete new one, never half of one.

Every file the runner and the exporters write goes through here: the content is written to a
temporary file in the target's folder, flushed to disk, given the usual permissions and renamed
over the target. A killed writer leaves at most a hidden ``.<name>.*.tmp`` file behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "atomic_write_file"]


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """``write(tmp_path)`` writes the content to a temporary path; it then replaces ``path``.

    For writers that want a file name (``torch.save``, safetensors, ONNX). Creates the parent
    folder if needed. Returns ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:  # the data reaches the disk before the rename makes it visible
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_file(path: str | os.PathLike, write: Callable[[IO[Any]], Any], mode: str = "wb") -> Path:
    """Like :func:`atomic_write` for writers that want an open file (``mode`` ``"wb"`` or ``"w"``)."""

    def to_path(tmp: str) -> None:
        with open(tmp, mode) as f:
            write(f)

    return atomic_write(path, to_path)
