"""The code location: one ``Definitions`` object.

Consumers come from the YAML files in ``durability_pipelines/consumers/`` (or
``$DURABILITY_CONSUMERS_DIR``): adding a consumer is adding a file.
"""

from __future__ import annotations

import os
from pathlib import Path

from dagster import Definitions

from durability_pipelines.consumer.config import CONSUMERS_DIR, load_consumer_configs
from durability_pipelines.defs.assets import build_audit_defs
from durability_pipelines.defs.consumers import build_consumer_defs
from durability_pipelines.defs.resources import durability_resource_from_env
from durability_pipelines.defs.retention import build_retention_defs

CONSUMERS_DIR_ENV = "DURABILITY_CONSUMERS_DIR"


def build_definitions(consumers_dir: Path | None = None) -> Definitions:
    directory = consumers_dir or Path(os.environ.get(CONSUMERS_DIR_ENV) or CONSUMERS_DIR)
    consumers = load_consumer_configs(directory)
    jobs, sensors = build_consumer_defs(consumers)
    assets, checks, (mirror_job, mirror_schedule) = build_audit_defs(consumers)
    retention_job, retention_schedule = build_retention_defs()
    return Definitions(
        assets=assets,
        asset_checks=checks,
        jobs=[*jobs, mirror_job, retention_job],
        sensors=sensors,
        schedules=[mirror_schedule, retention_schedule],
        resources={"durability": durability_resource_from_env()},
    )


defs = build_definitions()
