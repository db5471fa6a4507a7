"""Atomic writes: the target is the old file or the complete new one, no temporary left behind."""

from __future__ import annotations

import os
import stat

import pytest

from probmask.atomic_io import atomic_write, atomic_write_file


def test_writes_replace_the_file_and_leave_no_temporaries(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    assert atomic_write_file(target, lambda f: f.write("one"), mode="w") == target
    atomic_write(target, lambda tmp: open(tmp, "w").close() or open(tmp, "a").write("two"))
    assert target.read_text() == "two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not mkstemp's private 0o600


def test_a_failing_writer_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def fail(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write_file(target, fail)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
