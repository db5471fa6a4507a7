"""Writing files atomically: readers see the old file or the complete new one, never half of one.

Every file the runner and the exporters write goes through here: the content is written to a
temporary file in the target's folder, flushed to disk, given the usual permissions and renamed
over the target. A killed writer leaves at most a hidden ``.<name>.*.tmp`` file behind.

A write that fails because the disk (or the user's quota) is full raises ``OSError`` with
``errno.ENOSPC`` (or ``EDQUOT``) and the target's path as ``filename``, whatever the writer
raised: ``torch.save`` reports a full disk as an internal ``RuntimeError`` ("unexpected pos"). A
target that is an existing directory raises ``IsADirectoryError`` before anything is written.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "atomic_write_file", "is_disk_full"]

_FULL = (errno.ENOSPC, errno.EDQUOT)
_NEARLY_FULL_BYTES = 1 << 20  # a writer that failed with less free space than this ran out of it


def is_disk_full(err: BaseException, folder: str | os.PathLike | None = None) -> bool:
    """Whether ``err`` (or an exception it was raised from) says the disk or quota is full; for an
    error that is not an ``OSError`` (``torch.save``'s), also whether ``folder``'s file system has
    less than 1 MiB left."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _FULL:
            return True
        seen = seen.__cause__ or seen.__context__
    if folder is None or isinstance(err, OSError):
        return False
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < _NEARLY_FULL_BYTES


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """``write(tmp_path)`` writes the content to a temporary path; it then replaces ``path``.

    For writers that want a file name (``torch.save``, safetensors, ONNX). Creates the parent
    folder if needed. Returns ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        try:
            write(tmp)
            with open(tmp, "rb") as f:  # the data reaches the disk before the rename makes it visible
                os.fsync(f.fileno())
        except Exception as err:
            if is_disk_full(err, path.parent):
                code = err.errno if isinstance(err, OSError) and err.errno in _FULL else errno.ENOSPC
                raise OSError(code, os.strerror(code), str(path)) from err
            raise
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
