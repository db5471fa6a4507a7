"""``python -m probmask``: the same as the ``probmask`` command."""

from probmask.cli import main

raise SystemExit(main())
