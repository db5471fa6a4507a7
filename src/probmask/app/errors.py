"""The errors the command line turns into one line instead of a traceback."""

from __future__ import annotations

import errno

__all__ = ["ENVIRONMENT_ERRNOS", "UserError", "describe_os_error"]


class UserError(Exception):
    """A mistake the user can fix (unknown name, bad value, missing data): the message says how.

    ``probmask`` prints the message on one line to stderr and exits with status 2.
    """


# ``OSError``s that describe the user's files and disks rather than a bug: ``probmask`` reports
# them like a UserError, naming the path (see :func:`describe_os_error`).
ENVIRONMENT_ERRNOS = frozenset({
    errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR,
    errno.EEXIST, errno.ENOENT, errno.ENAMETOOLONG, errno.EFBIG, errno.EIO, errno.ELOOP, errno.EXDEV,
})

_FIXES = {
    errno.ENOSPC: "free some space or choose another folder",
    errno.EDQUOT: "free some space within your quota or choose another folder",
    errno.EACCES: "check its permissions or choose another path",
    errno.EPERM: "check its permissions or choose another path",
    errno.EROFS: "the file system is read-only: choose another path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EISDIR: "it is a folder: give a file path",
    errno.EEXIST: "something already exists there: choose another path",
    errno.ENOENT: "check the path",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.EFBIG: "the file would exceed the file-size limit: choose another folder",
}


def describe_os_error(err: OSError) -> str:
    """One line naming the path, what went wrong and what to do, e.g. ``no space left on
    runs/r/checkpoint.pt (No space left on device); free some space or choose another folder``."""
    where = err.filename if err.filename is not None else "a file"
    if err.filename2 is not None:
        where = f"{err.filename} -> {err.filename2}"
    reason = err.strerror or str(err)
    fix = _FIXES.get(err.errno or 0, "")
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        head = f"no space left on {where} ({reason})"
    else:
        head = f"{where}: {reason}"
    return f"{head}; {fix}" if fix else head
