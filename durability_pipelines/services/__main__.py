"""``python -m durability_pipelines.services {urls,stop,env}``."""

import sys

from durability_pipelines.services.cli import main

raise SystemExit(main(sys.argv[1:]))
