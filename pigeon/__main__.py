"""``python -m pigeon``: start the server."""

from pigeon.cli.server import main

raise SystemExit(main())
