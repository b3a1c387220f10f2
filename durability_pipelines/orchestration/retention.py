"""Run retention: delete old finished consumer runs, so that Dagster's run storage stays bounded.

Consumers start one run per shard about every minute: thousands of runs a day, each with its event
log, kept forever by default. What a consumer did is also in the project's own tables (checkpoints,
checkpoint history, dead letters, stream gaps), so an old successful run adds nothing but rows.

``run_retention_job`` deletes, oldest first and at most ``max_deletions`` per run:

* successful consumer runs (tag ``durability/consumer``) that finished more than
  ``finished_max_age_days`` ago (default 7, ``$DURABILITY_RUN_RETENTION_DAYS``);
* failed and canceled consumer runs after ``failed_max_age_days`` (default 30,
  ``$DURABILITY_RUN_RETENTION_FAILED_DAYS``): they are what an operator investigates;

and never: runs of other jobs (mirror, audit, this job), runs in flight, or a run an open (or
retrying) dead letter names, whatever its age. Each deleted run goes with its event log and its
captured stdout/stderr. ``run_retention_schedule`` (hourly, on by default) launches it; see
docs/operations.md#run-retention.
"""

# No `from __future__ import annotations`: Dagster resolves op parameter annotations at definition time.
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from dagster import (
    Config,
    DagsterInstance,
    DagsterRunStatus,
    DefaultScheduleStatus,
    Definitions,
    Failure,
    MetadataValue,
    OpExecutionContext,
    RunRecord,
    RunRequest,
    RunsFilter,
    ScheduleEvaluationContext,
    SkipReason,
    in_process_executor,
    job,
    op,
    schedule,
)
from pydantic import Field

from durability_pipelines.checkpoints.errors import ConfigError
from durability_pipelines.consumer.storage import ensure
from durability_pipelines.orchestration.consumers import CONSUMER_TAG
from durability_pipelines.orchestration.resources import DurabilityResource
from durability_pipelines.orchestration.run_queue import IN_FLIGHT_STATUSES, MAINTENANCE_RUN_TAGS

RETENTION_JOB = "run_retention_job"
RETENTION_SCHEDULE = "run_retention_schedule"
RETENTION_OP = "delete_old_consumer_runs"

RETENTION_ENABLED_ENV = "DURABILITY_RUN_RETENTION_ENABLED"
RETENTION_CRON_ENV = "DURABILITY_RUN_RETENTION_CRON"
RETENTION_DAYS_ENV = "DURABILITY_RUN_RETENTION_DAYS"
RETENTION_FAILED_DAYS_ENV = "DURABILITY_RUN_RETENTION_FAILED_DAYS"

DEFAULT_CRON = "17 * * * *"  # hourly, off the top of the hour
DEFAULT_FINISHED_DAYS = 7.0
DEFAULT_FAILED_DAYS = 30.0
DEFAULT_MAX_DELETIONS = 2000
DEFAULT_MAX_SECONDS = 120.0
DEFAULT_PAGE_SIZE = 200

#: Deleted after the short age.
SUCCEEDED = (DagsterRunStatus.SUCCESS,)
#: Kept for the long age: what an operator investigates.
FAILED = (DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED)
_DAY_S = 86_400.0
_FALSE = {"0", "false", "no", "off"}
_TRUE = {"1", "true", "yes", "on"}


class RetentionConfigError(ConfigError):
    """A retention setting (environment variable or run config) is not usable; the message names it."""


# --------------------------------------------------------------------------- settings


def _env_days(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        days = float(raw)
    except ValueError:
        days = -1.0
    if not days > 0:
        raise RetentionConfigError(
            f"${name}={raw!r} is not a positive number of days. To fix: set it to e.g. {default:g}, or "
            f"unset it for the default ({default:g} days)."
        )
    return days


def _env_enabled(env: Mapping[str, str]) -> bool:
    raw = env.get(RETENTION_ENABLED_ENV, "").strip().lower()
    if not raw or raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise RetentionConfigError(
        f"${RETENTION_ENABLED_ENV}={raw!r} is neither true nor false. To fix: set it to false to create "
        "run_retention_schedule stopped, or unset it (running)."
    )


@dataclass(frozen=True)
class RetentionSettings:
    """What the environment sets when the code location loads (run config can override the ages)."""

    enabled: bool = True
    cron: str = DEFAULT_CRON
    finished_days: float = DEFAULT_FINISHED_DAYS
    failed_days: float = DEFAULT_FAILED_DAYS

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "RetentionSettings":
        return cls(
            enabled=_env_enabled(env),
            cron=env.get(RETENTION_CRON_ENV, "").strip() or DEFAULT_CRON,
            finished_days=_env_days(env, RETENTION_DAYS_ENV, DEFAULT_FINISHED_DAYS),
            failed_days=_env_days(env, RETENTION_FAILED_DAYS_ENV, DEFAULT_FAILED_DAYS),
        )


@dataclass(frozen=True)
class RetentionPolicy:
    """One retention pass: the ages, the time they are measured from, and the bounds of the pass."""

    finished_max_age_s: float
    failed_max_age_s: float
    as_of: float  # "now", as a Unix timestamp
    max_deletions: int = DEFAULT_MAX_DELETIONS
    max_seconds: float = DEFAULT_MAX_SECONDS
    page_size: int = DEFAULT_PAGE_SIZE
    dry_run: bool = False

    def __post_init__(self) -> None:
        for name in ("finished_max_age_s", "failed_max_age_s", "max_seconds"):
            if not getattr(self, name) > 0:
                raise RetentionConfigError(f"run retention: {name} must be > 0, got {getattr(self, name)!r}")
        if self.max_deletions < 1 or self.page_size < 1:
            raise RetentionConfigError(
                f"run retention: max_deletions and page_size must be >= 1, got {self.max_deletions} and "
                f"{self.page_size}")

    def cutoffs(self) -> list[tuple[str, Sequence[DagsterRunStatus], float]]:
        """(name, statuses, finished-before timestamp), the long age first: failed runs are fewer."""
        return [("failed", FAILED, self.as_of - self.failed_max_age_s),
                ("finished", SUCCEEDED, self.as_of - self.finished_max_age_s)]


# --------------------------------------------------------------------------- the pass


@dataclass(frozen=True)
class DeletedRun:
    run_id: str
    job_name: str
    status: str
    created: float
    finished: float


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds")


@dataclass
class RetentionReport:
    """What a pass deleted (or, in a dry run, would delete) and what it kept, for the run's metadata."""

    policy: RetentionPolicy
    deleted: list[DeletedRun] = field(default_factory=list)
    kept_open_dead_letter: list[str] = field(default_factory=list)
    kept_not_consumer_job: list[str] = field(default_factory=list)
    scanned: int = 0
    limit_reached: bool = False
    compute_log_errors: list[str] = field(default_factory=list)
    duration_s: float = 0.0

    def by_job(self) -> dict[str, dict[str, Any]]:
        """Per job: how many runs, of which status, and the oldest and newest (by creation time)."""
        out: dict[str, dict[str, Any]] = {}
        for run in sorted(self.deleted, key=lambda r: r.created):
            entry = out.setdefault(run.job_name,
                                   {"deleted": 0, "by_status": {}, "oldest": None, "newest": None})
            entry["deleted"] += 1
            entry["by_status"][run.status] = entry["by_status"].get(run.status, 0) + 1
            described = {"run_id": run.run_id, "status": run.status, "created": _iso(run.created),
                         "finished": _iso(run.finished)}
            entry["oldest"] = entry["oldest"] or described
            entry["newest"] = described
        return dict(sorted(out.items()))

    def markdown(self) -> str:
        rows = self.by_job()
        if not rows:
            return "nothing to delete"
        lines = ["| job | deleted | SUCCESS | FAILURE | CANCELED | oldest created | newest created |",
                 "| --- | ---: | ---: | ---: | ---: | --- | --- |"]
        for name, e in rows.items():
            s = e["by_status"]
            lines.append(f"| {name} | {e['deleted']} | {s.get('SUCCESS', 0)} | {s.get('FAILURE', 0)} | "
                         f"{s.get('CANCELED', 0)} | {e['oldest']['created']} | {e['newest']['created']} |")
        return "\n".join(lines)

    def as_metadata(self) -> dict[str, Any]:
        p = self.policy
        return {
            "deleted_runs": len(self.deleted),
            "dry_run": p.dry_run,
            "deleted_by_job": MetadataValue.json(self.by_job()),
            "deleted_table": MetadataValue.md(self.markdown()),
            "kept_open_dead_letter": len(self.kept_open_dead_letter),
            "kept_open_dead_letter_runs": MetadataValue.json(self.kept_open_dead_letter[:100]),
            "kept_not_consumer_job": len(self.kept_not_consumer_job),
            "scanned_runs": self.scanned,
            "limit_reached": self.limit_reached,
            "as_of": _iso(p.as_of),
            "finished_cutoff": _iso(p.as_of - p.finished_max_age_s),
            "failed_cutoff": _iso(p.as_of - p.failed_max_age_s),
            "finished_max_age_days": round(p.finished_max_age_s / _DAY_S, 6),
            "failed_max_age_days": round(p.failed_max_age_s / _DAY_S, 6),
            "compute_log_errors": MetadataValue.json(self.compute_log_errors[:20]),
            "duration_s": round(self.duration_s, 3),
        }

    def describe(self) -> str:
        verb = "would delete" if self.policy.dry_run else "deleted"
        jobs = ", ".join(f"{name} {e['deleted']}" for name, e in self.by_job().items()) or "none"
        kept = (f"; kept {len(self.kept_open_dead_letter)} that an open dead letter names"
                if self.kept_open_dead_letter else "")
        more = "; more remain: the next run goes on" if self.limit_reached else ""
        return f"{verb} {len(self.deleted)} consumer run(s) ({jobs}){kept}{more}"


def open_dead_letter_runs(durability: DurabilityResource) -> set[str]:
    """Run ids that a dead letter not yet resolved names: the operator still needs those runs."""
    db = durability.postgres()
    ensure(db)
    with db.connection() as conn:
        rows = conn.execute(
            "SELECT DISTINCT run_id FROM dead_letters WHERE status <> 'resolved' AND run_id IS NOT NULL"
        ).fetchall()
    return {r[0] for r in rows}


def _consumer_names(instance: DagsterInstance) -> list[str]:
    for key, values in instance.get_run_tags(tag_keys=[CONSUMER_TAG]):
        if key == CONSUMER_TAG:
            return sorted(values)
    return []


def _records(instance: DagsterInstance, filters: RunsFilter, page_size: int) -> Iterator[RunRecord]:
    """Oldest first, page by page (a cursor on the storage id: nothing is deleted while this reads)."""
    cursor: str | None = None
    while True:
        page = instance.get_run_records(filters=filters, limit=page_size, ascending=True, cursor=cursor)
        yield from page
        if len(page) < page_size:
            return
        cursor = page[-1].dagster_run.run_id


class RunRetention:
    """Find, then delete, the consumer runs a :class:`RetentionPolicy` lets go.

    Reading comes first and deleting second, because a page cursor is a run id: deleting the run a
    cursor names would end the listing early.
    """

    def __init__(self, instance: DagsterInstance, policy: RetentionPolicy, *, protected: set[str],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.instance = instance
        self.policy = policy
        self.protected = protected
        self.clock = clock

    def run(self) -> RetentionReport:
        started = self.clock()
        report = RetentionReport(self.policy)
        doomed = self._plan(report, started)
        for run in doomed:
            if self.clock() - started > self.policy.max_seconds:
                report.limit_reached = True
                break
            if not self.policy.dry_run:
                self._delete(run.run_id, report)
            report.deleted.append(run)
        report.duration_s = self.clock() - started
        return report

    def _plan(self, report: RetentionReport, started: float) -> list[DeletedRun]:
        p = self.policy
        consumers = _consumer_names(self.instance)
        doomed: list[DeletedRun] = []
        if not consumers:
            return doomed
        max_scanned = 10 * p.max_deletions + p.page_size  # kept runs are few; this only bounds a surprise
        for _, statuses, cutoff in p.cutoffs():
            filters = RunsFilter(statuses=list(statuses), tags={CONSUMER_TAG: consumers},
                                 created_before=datetime.fromtimestamp(cutoff, tz=timezone.utc))
            for record in _records(self.instance, filters, p.page_size):
                if len(doomed) >= p.max_deletions or report.scanned >= max_scanned or (
                        self.clock() - started > p.max_seconds):
                    report.limit_reached = True
                    return doomed
                report.scanned += 1
                run = record.dagster_run
                if run.status in IN_FLIGHT_STATUSES or run.status not in statuses:
                    continue  # never in flight (the filter says so; this is the guard)
                if run.job_name != f"{run.tags.get(CONSUMER_TAG)}_job":
                    report.kept_not_consumer_job.append(run.run_id)  # a consumer tag on another job's run
                    continue
                created = record.create_timestamp.timestamp()
                # Ages count from the end of the run (a Unix time, whatever the server's time zone).
                finished = record.end_time if record.end_time is not None else created
                if finished >= cutoff:
                    continue
                if run.run_id in self.protected:
                    report.kept_open_dead_letter.append(run.run_id)
                    continue
                doomed.append(DeletedRun(run.run_id, run.job_name, run.status.value, created, finished))
        return doomed

    def _delete(self, run_id: str, report: RetentionReport) -> None:
        self.instance.delete_run(run_id)  # the run and its event log
        try:  # delete_run leaves the captured stdout/stderr: files under $DAGSTER_HOME/storage, or a bucket
            self.instance.compute_log_manager.delete_logs(prefix=[run_id, "compute_logs"])
        except Exception as exc:  # any compute log manager's own error: the run itself is gone either way
            report.compute_log_errors.append(f"{run_id}: {type(exc).__name__}: {exc}")


def _parse_as_of(value: str) -> float:
    if not value:
        return time.time()
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise RetentionConfigError(
            f"run retention: as_of={value!r} is not an ISO 8601 time. To fix: use e.g. "
            "2026-01-31T00:00:00+00:00, or leave it empty for now."
        ) from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).timestamp()


# --------------------------------------------------------------------------- Dagster definitions


def build_retention_defs(environ: Mapping[str, str] | None = None) -> Definitions:
    """The retention job and its schedule; the environment (default ``os.environ``) sets the defaults."""
    settings = RetentionSettings.from_env(os.environ if environ is None else environ)

    class RunRetentionConfig(Config):
        finished_max_age_days: float = Field(
            default=settings.finished_days,
            description=f"delete successful consumer runs that finished longer ago (${RETENTION_DAYS_ENV})")
        failed_max_age_days: float = Field(
            default=settings.failed_days,
            description=f"delete failed/canceled consumer runs that finished longer ago "
                        f"(${RETENTION_FAILED_DAYS_ENV}); runs an open dead letter names are kept")
        max_deletions: int = Field(default=DEFAULT_MAX_DELETIONS,
                                   description="at most this many runs per run: the next tick goes on")
        max_seconds: float = Field(
            default=DEFAULT_MAX_SECONDS,
            description="stop after this long: the maintenance slot is shared with the mirror")
        page_size: int = Field(default=DEFAULT_PAGE_SIZE, description="run records read per query")
        as_of: str = Field(default="", description="ISO 8601 time to measure ages from (empty = now)")
        dry_run: bool = Field(default=False, description="report what would be deleted, delete nothing")

    @op(name=RETENTION_OP, tags={"kind": "maintenance"})
    def delete_old_consumer_runs(context: OpExecutionContext, config: RunRetentionConfig,
                                 durability: DurabilityResource) -> None:
        """Delete old finished consumer runs (oldest first, bounded); the metadata says which."""
        try:
            policy = RetentionPolicy(
                finished_max_age_s=config.finished_max_age_days * _DAY_S,
                failed_max_age_s=config.failed_max_age_days * _DAY_S,
                as_of=_parse_as_of(config.as_of), max_deletions=config.max_deletions,
                max_seconds=config.max_seconds, page_size=config.page_size, dry_run=config.dry_run)
        except RetentionConfigError as exc:
            raise Failure(str(exc), allow_retries=False) from exc
        # Read before anything is deleted: if the project's Postgres is down, nothing is.
        protected = open_dead_letter_runs(durability)
        report = RunRetention(context.instance, policy, protected=protected).run()
        context.log.info(report.describe())
        for error in report.compute_log_errors[:5]:
            context.log.warning(f"captured logs not deleted: {error}")
        context.add_output_metadata(report.as_metadata())

    @job(
        name=RETENTION_JOB,
        description=f"Delete old finished consumer runs (successful after {settings.finished_days:g} "
                    f"days, failed/canceled after {settings.failed_days:g}); never other jobs' runs, runs in "
                    "flight, or runs an open dead letter names.",
        # One process; maintenance priority and concurrency: one maintenance run at a time (run_queue.py).
        executor_def=in_process_executor,
        tags=MAINTENANCE_RUN_TAGS,
    )
    def run_retention_job() -> None:
        delete_old_consumer_runs()

    default_status = DefaultScheduleStatus.RUNNING if settings.enabled else DefaultScheduleStatus.STOPPED

    @schedule(name=RETENTION_SCHEDULE, job=run_retention_job, cron_schedule=settings.cron,
              default_status=default_status,
              description="Deletes old finished consumer runs; skips a tick while the previous run is queued "
                          f"or running. ${RETENTION_ENABLED_ENV}=false creates it stopped.")
    def run_retention_schedule(context: ScheduleEvaluationContext) -> RunRequest | SkipReason:
        busy = context.instance.get_runs(
            filters=RunsFilter(job_name=RETENTION_JOB, statuses=list(IN_FLIGHT_STATUSES)), limit=1)
        if busy:
            run = busy[0]
            return SkipReason(f"run {run.run_id} of {RETENTION_JOB} is still {run.status.value}: this tick "
                              "is skipped so that retention runs never pile up in the queue")
        return RunRequest()

    return Definitions(jobs=[run_retention_job], schedules=[run_retention_schedule])
