"""``python -m durability_pipelines.cli``: the same as the ``durability-pipelines`` command."""

from durability_pipelines.cli.main import main

raise SystemExit(main())
