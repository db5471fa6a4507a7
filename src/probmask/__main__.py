"""``python -m probmask``: the same as the ``probmask`` command."""

from probmask.app.cli import main

raise SystemExit(main())
