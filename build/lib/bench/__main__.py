"""``python -m bench LEAF ...`` (the same leaves as ``magnus bench``)."""

from bench.cli import main

raise SystemExit(main())
