"""``python -m pigeon``: start the server."""

from pigeon.cli import main

raise SystemExit(main())
