"""Drive a consumer's sensor and job in-process on a real Dagster instance (no daemon).

The daemon path is covered by tests/test_dagster_e2e.py; this keeps starter and pipeline tests
fast while still evaluating the real sensor and executing the real job.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dagster import DagsterInstance, Definitions, build_sensor_context


@dataclass
class Driver:
    defs: Definitions
    consumer: str
    instance: DagsterInstance = field(default_factory=DagsterInstance.ephemeral)
    cursor: str | None = None
    runs: list = field(default_factory=list)

    def tick(self):
        sensor = self.defs.get_sensor_def(f"{self.consumer}_sensor")
        ctx = build_sensor_context(instance=self.instance, cursor=self.cursor, sensor_name=sensor.name,
                                   resources={"durability": self.defs.resources["durability"]})
        result = sensor(ctx)
        self.cursor = result.cursor
        return result

    def drain(self, max_ticks: int = 50) -> int:
        """Tick and run every requested batch until a tick requests nothing; returns runs executed."""
        job = self.defs.resolve_job_def(f"{self.consumer}_job")
        executed = 0
        for _ in range(max_ticks):
            result = self.tick()
            if not result.run_requests:
                return executed
            for req in result.run_requests:
                out = job.execute_in_process(
                    run_config=req.run_config, instance=self.instance,
                    tags={**req.tags, "dagster/run_key": req.run_key}, raise_on_error=False,
                )
                self.runs.append(out)
                executed += 1
        raise AssertionError(f"{self.consumer}: still dispatching after {max_ticks} ticks")
