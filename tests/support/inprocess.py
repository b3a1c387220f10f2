"""Drive a consumer's sensor and job in-process on a real Dagster instance (no daemon).

The daemon path is covered by tests/test_dagster_e2e.py; this keeps starter and pipeline tests
fast while still evaluating the real sensor and executing the real job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dagster import (
    DagsterEventType,
    DagsterInstance,
    Definitions,
    ExecuteInProcessResult,
    build_sensor_context,
)


def drain_metadata(result: ExecuteInProcessResult) -> dict[str, Any]:
    """The ``drain_shard`` op's output metadata of a run (batches, events, stop_reason, batch_log, ...)."""
    for event in result.all_events:
        if event.event_type == DagsterEventType.STEP_OUTPUT and event.step_key == "drain_shard":
            return {k: v.value for k, v in event.event_specific_data.metadata.items()}
    raise AssertionError(f"run {result.run_id} has no drain_shard output (did it fail?)")


def log_messages(instance: DagsterInstance, result: ExecuteInProcessResult) -> list[str]:
    """What the run's ops logged (``context.log``), in order."""
    return [e.user_message for e in instance.all_logs(result.run_id) if not e.is_dagster_event]


@dataclass
class Driver:
    defs: Definitions
    consumer: str
    instance: DagsterInstance = field(default_factory=DagsterInstance.ephemeral)
    cursor: str | None = None
    runs: list = field(default_factory=list)

    def tick(self):
        sensor = self.defs.get_sensor_def(f"{self.consumer}_sensor")
        # A context manager, as the daemon does: the resource's shared connections are closed after the tick.
        with build_sensor_context(instance=self.instance, cursor=self.cursor, sensor_name=sensor.name,
                                  resources={"durability": self.defs.resources["durability"]}) as ctx:
            result = sensor(ctx)
        self.cursor = result.cursor
        return result

    def batches(self, runs: list[ExecuteInProcessResult] | None = None) -> int:
        """Batches processed by ``runs`` (default: every run so far), from the op's metadata."""
        return sum(drain_metadata(r)["batches"] for r in (self.runs if runs is None else runs) if r.success)

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
