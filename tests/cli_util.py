"""Helpers for tests that drive the ``probmask`` command in-process."""

from __future__ import annotations

import hashlib
from pathlib import Path

from probmask.app.cli import main


def run(capsys, *argv) -> tuple[int, str, str]:
    """``probmask ARGV``: (exit status, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, *needles: str) -> None:
    """Exit status 2 and exactly one line ``probmask: error: ...`` holding every needle; no
    traceback, no terminal escape, never PyTorch's advice to load a file unsafely."""
    assert code == 2, err
    assert err.startswith("probmask: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and "\x1b" not in err and "weights_only" not in err
    for needle in needles:
        assert needle in err, err


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with its kind, size, modification time and (files) content hash."""
    seen = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        seen[str(path.relative_to(root))] = (path.is_dir(), st.st_size, st.st_mtime_ns, digest)
    return seen
