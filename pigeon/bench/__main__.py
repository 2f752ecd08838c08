"""``python -m pigeon.bench``: the load generator, as ``pigeon-cli bench``."""

from pigeon.bench.load import main

raise SystemExit(main())
