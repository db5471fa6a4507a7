"""The one exception the command line turns into a message instead of a traceback."""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """A mistake the user can fix (unknown name, bad value, missing data): the message says how.

    ``probmask`` prints the message on one line to stderr and exits with status 2.
    """
