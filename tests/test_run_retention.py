"""Run retention on a real Postgres-backed Dagster instance (the repository's dagster.yaml).

Runs are real: tiny jobs named like consumer jobs, tagged ``durability/consumer``, executed in
process; in-flight and canceled runs come from the instance API. Instead of back-dating runs, each
pass measures ages from ``as_of`` in the future: a boundary taken between the "old" and the "new"
runs plus the retention age.
"""

# No `from __future__ import annotations`: Dagster checks the op's `context` annotation at definition time.
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from dagster import (
    DagsterEventType,
    DagsterInstance,
    DagsterRunStatus,
    DefaultScheduleStatus,
    ExecuteInProcessResult,
    Failure,
    JobDefinition,
    OpExecutionContext,
    RunRequest,
    SkipReason,
    build_schedule_context,
    job,
    op,
)

from durability_pipelines.consumer.storage import ConsumerStorage, ensure
from durability_pipelines.orchestration.consumers import CONSUMER_TAG
from durability_pipelines.orchestration.resources import DurabilityResource
from durability_pipelines.orchestration.retention import (
    RETENTION_DAYS_ENV,
    RETENTION_ENABLED_ENV,
    RETENTION_JOB,
    RETENTION_OP,
    RetentionConfigError,
    build_retention_defs,
)
from durability_pipelines.orchestration.run_queue import MAINTENANCE_RUN_TAGS
from tests.support.dagster_daemon import DagsterHome

DAY = 86_400.0


@op(config_schema={"fail": bool})
def drain(context: OpExecutionContext) -> None:
    print("draining")  # captured stdout: retention deletes it with the run
    if context.op_config["fail"]:
        raise Failure("batch dead-lettered", metadata={"dead_letter_id": 1}, allow_retries=False)


def _consumer_job(consumer: str, name: str | None = None) -> JobDefinition:
    @job(name=name or f"{consumer}_job", tags={CONSUMER_TAG: consumer, "dagster/max_retries": "0"},
         config={"ops": {"drain": {"config": {"fail": False}}}})
    def _job() -> None:
        drain()

    return _job


ORDERS = _consumer_job("orders_worker")
SUPABASE = _consumer_job("supabase_orders_worker")
MISLABELED = _consumer_job("orders_worker", name="mislabeled_job")  # a consumer tag on another job


@job(name="checkpoint_mirror_job", tags=MAINTENANCE_RUN_TAGS)
def MIRROR() -> None:  # noqa: N802 - named like the job it stands for
    drain()


@pytest.fixture
def home(tmp_path: Path, postgres_admin_url: str) -> Iterator[DagsterHome]:
    dagster_home = DagsterHome.create(tmp_path, postgres_admin_url, prefix="dp_retention")
    try:
        yield dagster_home
    finally:
        dagster_home.dispose()


@pytest.fixture
def durability(postgres_url: str) -> Iterator[DurabilityResource]:
    resource = DurabilityResource(postgres_url=postgres_url)
    ensure(resource.postgres())
    yield resource
    resource.close()


def _execute(instance: DagsterInstance, job_def: JobDefinition, *, fail: bool = False) -> str:
    result = job_def.execute_in_process(
        instance=instance, raise_on_error=False,
        run_config={"ops": {"drain": {"config": {"fail": fail}}}})
    assert result.success is (not fail)
    return result.run_id


def _retention(instance: DagsterInstance, durability: DurabilityResource, *, as_of: float,
               **config: Any) -> tuple[ExecuteInProcessResult, dict[str, Any]]:
    retention_job, _ = retention_parts({})
    when = datetime.fromtimestamp(as_of, timezone.utc).isoformat()
    run_config = {"ops": {RETENTION_OP: {"config": {"as_of": when, **config}}}}
    result = retention_job.execute_in_process(instance=instance, run_config=run_config,
                                              resources={"durability": durability})
    assert result.success
    return result, _output_metadata(result)


def retention_parts(environ: dict[str, str]) -> tuple[JobDefinition, Any]:
    """The retention job and schedule out of the ``Definitions`` the builder returns."""
    defs = build_retention_defs(environ)
    return next(iter(defs.jobs or [])), next(iter(defs.schedules or []))


def _output_metadata(result: ExecuteInProcessResult) -> dict[str, Any]:
    for event in result.all_events:
        if event.event_type == DagsterEventType.STEP_OUTPUT and event.step_key == RETENTION_OP:
            return {k: v.value for k, v in event.event_specific_data.metadata.items()}
    raise AssertionError(f"run {result.run_id}: the retention op reported no output metadata")


def _queued(instance: DagsterInstance, job_def: JobDefinition) -> str:
    """A run waiting in the queue (a queued run needs the origin the daemon would launch it from)."""
    from dagster._core.remote_origin import (
        InProcessCodeLocationOrigin,
        RemoteJobOrigin,
        RemoteRepositoryOrigin,
    )
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

    location = InProcessCodeLocationOrigin(LoadableTargetOrigin(python_file=__file__))
    origin = RemoteJobOrigin(RemoteRepositoryOrigin(location, "__repository__"), job_def.name)
    run = instance.create_run_for_job(job_def, tags=job_def.tags, status=DagsterRunStatus.QUEUED,
                                      remote_job_origin=origin)
    return run.run_id


def _exists(instance: DagsterInstance, run_id: str) -> bool:
    return instance.get_run_by_id(run_id) is not None


def _compute_log_dir(home: DagsterHome, run_id: str) -> Path:
    return home.path / "storage" / run_id / "compute_logs"


def test_retention_deletes_old_finished_consumer_runs_and_keeps_failed_in_flight_and_other_jobs(
    home: DagsterHome, durability: DurabilityResource
) -> None:
    instance = home.instance()
    old_ok = _execute(instance, ORDERS)
    old_ok_supabase = _execute(instance, SUPABASE)
    old_failed = _execute(instance, ORDERS, fail=True)
    old_dead_lettered = _execute(instance, ORDERS, fail=True)
    old_mirror = _execute(instance, MIRROR)
    old_mislabeled = _execute(instance, MISLABELED)
    queued = _queued(instance, ORDERS)
    not_started = instance.create_run_for_job(ORDERS, tags=ORDERS.tags)
    started = instance.create_run_for_job(ORDERS, status=DagsterRunStatus.STARTED, tags=ORDERS.tags).run_id
    canceled = instance.create_run_for_job(ORDERS, tags=ORDERS.tags)
    instance.report_run_canceled(canceled)
    time.sleep(0.2)
    boundary = time.time()
    time.sleep(0.2)
    new_ok = _execute(instance, ORDERS)
    new_failed = _execute(instance, ORDERS, fail=True)

    dead_letters = ConsumerStorage(durability.postgres())
    dl_id = dead_letters.add_dead_letter(
        consumer="orders_worker", adapter="dynamodb", stream="orders", group="workers", shard="shard-1",
        first_sequence="1", last_sequence="9", record_count=9, error="poison", attempts=4, policy="stop",
        run_id=old_dead_lettered)
    assert _compute_log_dir(home, old_ok).is_dir()  # captured stdout/stderr exist before retention

    everything = {old_ok, old_ok_supabase, old_failed, old_dead_lettered, old_mirror, old_mislabeled, queued,
                  not_started.run_id, started, canceled.run_id, new_ok, new_failed}

    # 7 days after the boundary: the successful consumer runs before it are due, nothing else.
    _, meta = _retention(instance, durability, as_of=boundary + 7 * DAY)
    assert not _exists(instance, old_ok) and not _exists(instance, old_ok_supabase)
    assert not _compute_log_dir(home, old_ok).exists()
    assert instance.all_logs(old_ok) == []
    kept = everything - {old_ok, old_ok_supabase}
    assert all(_exists(instance, r) for r in kept)
    assert meta["deleted_runs"] == 2 and meta["dry_run"] is False and meta["limit_reached"] is False
    by_job = meta["deleted_by_job"]
    assert set(by_job) == {"orders_worker_job", "supabase_orders_worker_job"}
    assert by_job["orders_worker_job"]["deleted"] == 1
    assert by_job["orders_worker_job"]["by_status"] == {"SUCCESS": 1}
    orders = by_job["orders_worker_job"]
    assert orders["oldest"]["run_id"] == orders["newest"]["run_id"] == old_ok
    assert by_job["supabase_orders_worker_job"]["oldest"]["run_id"] == old_ok_supabase
    assert meta["kept_not_consumer_job"] == 1  # the mislabeled one, looked at and kept
    assert "orders_worker_job | 1 | 1 | 0 | 0" in meta["deleted_table"]

    # 30 days after: failed and canceled ones too, except the run an open dead letter names;
    # by now the new successful run is 23 days old (due), the new failed one is not.
    _, meta = _retention(instance, durability, as_of=boundary + 30 * DAY)
    gone = {old_failed, canceled.run_id, new_ok}
    assert not any(_exists(instance, r) for r in gone)
    kept -= gone
    assert kept == {old_dead_lettered, old_mirror, old_mislabeled, queued, not_started.run_id, started,
                    new_failed}
    assert all(_exists(instance, r) for r in kept)
    assert meta["deleted_runs"] == 3 and meta["kept_open_dead_letter"] == 1
    assert meta["kept_open_dead_letter_runs"] == [old_dead_lettered]
    orders = meta["deleted_by_job"]["orders_worker_job"]
    assert orders["by_status"] == {"FAILURE": 1, "CANCELED": 1, "SUCCESS": 1}
    assert meta["deleted_by_job"]["orders_worker_job"]["oldest"]["run_id"] == old_failed
    assert meta["deleted_by_job"]["orders_worker_job"]["newest"]["run_id"] == new_ok

    # The operator resolves the dead letter: its run goes at the next pass. Nothing else ever does,
    # whatever the age: runs of other jobs, a consumer tag on another job, runs in flight.
    assert dead_letters.set_dead_letter_status(dl_id, "resolved", by="test")
    _, meta = _retention(instance, durability, as_of=boundary + 3650 * DAY)
    assert not _exists(instance, old_dead_lettered) and not _exists(instance, new_failed)
    assert meta["deleted_runs"] == 2
    survivors = {old_mirror, old_mislabeled, queued, not_started.run_id, started}
    assert all(_exists(instance, r) for r in survivors)
    statuses = {instance.get_run_by_id(r).status for r in (queued, not_started.run_id, started)}
    assert statuses == {DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTED}
    # ... and the retention runs themselves are kept (not consumer runs).
    assert len(instance.get_run_records(filters=None)) == len(survivors) + 3


def test_retention_is_bounded_per_run_and_the_next_run_goes_on(
    home: DagsterHome, durability: DurabilityResource
) -> None:
    instance = home.instance()
    runs = [_execute(instance, ORDERS) for _ in range(3)]
    as_of = time.time() + 8 * DAY

    _, meta = _retention(instance, durability, as_of=as_of, max_deletions=2, page_size=1)
    assert meta["deleted_runs"] == 2 and meta["limit_reached"] is True
    assert [_exists(instance, r) for r in runs] == [False, False, True]  # oldest first
    assert meta["deleted_by_job"]["orders_worker_job"]["oldest"]["run_id"] == runs[0]
    assert meta["deleted_by_job"]["orders_worker_job"]["newest"]["run_id"] == runs[1]

    _, meta = _retention(instance, durability, as_of=as_of, max_deletions=2, page_size=1)
    assert meta["deleted_runs"] == 1 and meta["limit_reached"] is False
    assert not _exists(instance, runs[2])


def test_dry_run_reports_what_it_would_delete_and_deletes_nothing(
    home: DagsterHome, durability: DurabilityResource
) -> None:
    instance = home.instance()
    run_id = _execute(instance, ORDERS)
    _, meta = _retention(instance, durability, as_of=time.time() + 8 * DAY, dry_run=True)
    assert meta["dry_run"] is True and meta["deleted_runs"] == 1
    assert meta["deleted_by_job"]["orders_worker_job"]["oldest"]["run_id"] == run_id
    assert _exists(instance, run_id)


def test_retention_job_runs_in_one_process_as_maintenance_and_its_schedule_skips_while_one_is_in_flight(
    home: DagsterHome, monkeypatch: pytest.MonkeyPatch
) -> None:
    retention_job, schedule = retention_parts({})
    assert retention_job.name == RETENTION_JOB
    assert retention_job.executor_def.name == "in_process"
    assert {k: retention_job.tags[k] for k in MAINTENANCE_RUN_TAGS} == MAINTENANCE_RUN_TAGS
    assert schedule.default_status == DefaultScheduleStatus.RUNNING

    instance = home.instance()
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", home.storage_url)  # the context re-opens the instance
    with build_schedule_context(instance=instance) as context:
        assert isinstance(schedule(context), RunRequest)
    queued = _queued(instance, retention_job)
    with build_schedule_context(instance=instance) as context:
        skipped = schedule(context)
    assert isinstance(skipped, SkipReason)
    assert queued in (skipped.skip_message or "") and "QUEUED" in (skipped.skip_message or "")


def test_environment_sets_the_defaults_and_a_bad_value_names_the_variable(
    home: DagsterHome, durability: DurabilityResource
) -> None:
    retention_job, schedule = retention_parts({RETENTION_DAYS_ENV: "3", RETENTION_ENABLED_ENV: "false"})
    assert schedule.default_status == DefaultScheduleStatus.STOPPED
    result = retention_job.execute_in_process(instance=home.instance(), resources={"durability": durability})
    meta = _output_metadata(result)
    assert meta["finished_max_age_days"] == 3 and meta["failed_max_age_days"] == 30
    with pytest.raises(RetentionConfigError, match=RETENTION_DAYS_ENV):
        build_retention_defs({RETENTION_DAYS_ENV: "a week"})
    with pytest.raises(RetentionConfigError, match=RETENTION_ENABLED_ENV):
        build_retention_defs({RETENTION_ENABLED_ENV: "maybe"})


def test_bad_run_config_fails_the_run_with_the_fix(home: DagsterHome, postgres_url: str) -> None:
    retention_job, _ = retention_parts({})
    result = retention_job.execute_in_process(
        instance=home.instance(), raise_on_error=False,
        run_config={"ops": {RETENTION_OP: {"config": {"as_of": "yesterday"}}}},
        resources={"durability": DurabilityResource(postgres_url=postgres_url)})
    assert not result.success
    failure = result.failure_data_for_node(RETENTION_OP)
    assert failure is not None and "ISO 8601" in failure.error.message
