"""The code location loads: every definition, resource and starter config resolves."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from dagster import Definitions

ROOT = Path(__file__).resolve().parent.parent


def test_definitions_load_with_every_job_sensor_asset_and_schedule() -> None:
    from durability_pipelines.definitions import defs

    assert isinstance(defs, Definitions)
    repo = defs.get_repository_def()
    jobs = {j.name for j in repo.get_all_jobs()}
    assert {"orders_worker_job", "checkpoint_mirror_job", "run_retention_job"} <= jobs
    assert {s.name for s in repo.sensor_defs} >= {"orders_worker_sensor"}
    assert {s.name for s in repo.schedule_defs} == {"checkpoint_mirror_schedule", "run_retention_schedule"}
    assert {k.path[-1] for k in repo.asset_graph.get_all_asset_keys()} == {
        "checkpoint_mirror", "checkpoint_audit", "checkpoint_history_summary"}
    job = defs.resolve_job_def("orders_worker_job")
    assert [n.name for n in job.graph.node_defs] == ["drain_shard"]  # a run drains its shard, batch by batch


def test_every_job_runs_its_steps_in_one_process_and_consumers_go_first_in_the_queue() -> None:
    from durability_pipelines.definitions import defs

    consumer = defs.resolve_job_def("orders_worker_job")
    mirror = defs.resolve_job_def("checkpoint_mirror_job")
    retention = defs.resolve_job_def("run_retention_job")
    assert {job.executor_def.name for job in (consumer, mirror, retention)} == {"in_process"}
    assert int(consumer.tags["dagster/priority"]) > int(mirror.tags["dagster/priority"])
    assert mirror.tags["durability/role"] == retention.tags["durability/role"] == "maintenance"
    assert retention.tags["dagster/priority"] == mirror.tags["dagster/priority"]
    # dagster.yaml limits maintenance runs to one at a time
    import yaml

    config = yaml.safe_load((ROOT / "dagster_home" / "dagster.yaml").read_text())["run_coordinator"]["config"]
    assert {"key": "durability/role", "value": "maintenance", "limit": 1} in config["tag_concurrency_limits"]


def test_dagster_definitions_validate_passes_on_the_workspace_and_leaves_nothing_in_the_tree(
    tmp_path: Path,
) -> None:
    # Without DAGSTER_HOME, `validate` makes a .tmp_dagster_home_* folder in the working directory.
    before = set(ROOT.glob(".tmp_dagster_home_*"))
    out = subprocess.run(
        [str(Path(sys.executable).parent / "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "DAGSTER_HOME": str(tmp_path)},  # an empty home: a default instance in tmp_path
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Validation successful" in out.stdout + out.stderr
    assert set(ROOT.glob(".tmp_dagster_home_*")) == before
