"""A consumer file that cannot be loaded, shown where operators look, without taking the others down.

Why not fail the code location (Dagster's default): one bad ``defs.yaml`` dropped into the consumers folder
would stop every run of every consumer and the mirror until it is removed. Instead the file is left out and a
sensor of its own, running by default, fails every tick with the file, the field and the fix, so it is red on
the Automation page and in alerting on failed ticks; ``dg check defs`` still fails on it (``definitions.py``).
"""

# No `from __future__ import annotations`: Dagster resolves sensor parameter annotations at definition time.

import re

from dagster import DefaultSensorStatus, Definitions, SensorEvaluationContext, sensor

from durability_pipelines.checkpoints.errors import ConfigError
from durability_pipelines.consumer.config import BrokenConsumer

#: A broken file's sensor reports it this often (it reads nothing, launches nothing).
REPORT_EVERY_S = 60


def broken_sensor_name(broken: BrokenConsumer, index: int) -> str:
    """``broken_consumer_<folder>``: the consumer's folder names it (its YAML may not even parse)."""
    folder = broken.path.parent.name if broken.path.name in ("defs.yaml", "defs.yml") else broken.path.stem
    slug = re.sub(r"[^A-Za-z0-9_]", "_", folder).strip("_") or f"file_{index}"
    return f"broken_consumer_{slug}"


def build_broken_defs(broken: list[BrokenConsumer]) -> Definitions:
    sensors, names = [], set()
    for index, item in enumerate(broken):
        name = broken_sensor_name(item, index)
        if name in names:
            name = f"{name}_{index}"
        names.add(name)
        sensors.append(_broken_sensor(name, item))
    return Definitions(sensors=sensors)


def _broken_sensor(name: str, item: BrokenConsumer):
    message = (f"{item.message}\nThis consumer is left out of the code location (the other consumers, the mirror "
               f"and retention run as usual). Fix or remove {item.path}; `dg check defs` lists every problem with "
               "its line, and this sensor disappears once the file loads.")

    @sensor(name=name, minimum_interval_seconds=REPORT_EVERY_S, default_status=DefaultSensorStatus.RUNNING,
            description=f"Reports the consumer file {item.path}, which cannot be loaded: {item.message[:300]}")
    def _report(context: SensorEvaluationContext):
        raise ConfigError(message)

    return _report
