"""Scheduled mirror and checkpoint audit assets, with asset checks.

``checkpoint_mirror`` (Redis <-> Postgres, monotonic both ways) runs on a
schedule (every minute by default, ``DURABILITY_MIRROR_CRON``);
``checkpoint_audit`` and ``checkpoint_history_summary`` are pandas tables
persisted to Postgres and materialized with table metadata and numeric
figures the UI plots over materializations.
"""

# No `from __future__ import annotations`: Dagster inspects asset/check signatures at definition time.
import os
from collections.abc import Sequence

import pandas as pd
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    AssetSelection,
    Config,
    DefaultScheduleStatus,
    Definitions,
    MaterializeResult,
    MetadataValue,
    RunRequest,
    RunsFilter,
    ScheduleEvaluationContext,
    SkipReason,
    TableColumn,
    TableSchema,
    asset,
    asset_check,
    define_asset_job,
    in_process_executor,
    schedule,
)

from durability_pipelines.audit.tables import (
    AUDIT_COLUMNS,
    SUMMARY_COLUMNS,
    AuditThresholds,
    build_checkpoint_audit,
    build_history_summary,
    markdown_preview,
    measure_retained_log,
    persist,
)
from durability_pipelines.checkpoints.mirror import CheckpointMirror
from durability_pipelines.consumer.config import ConsumerConfig
from durability_pipelines.consumer.cursor_mirror import CursorMirror
from durability_pipelines.consumer.storage import ConsumerStorage
from durability_pipelines.observability import ACK_SUCCESS_RATE, Labels, Metrics
from durability_pipelines.orchestration.consumers import lag_check_key
from durability_pipelines.orchestration.resources import DurabilityResource
from durability_pipelines.orchestration.run_queue import IN_FLIGHT_STATUSES, MAINTENANCE_RUN_TAGS

MIRROR_CRON_ENV = "DURABILITY_MIRROR_CRON"
MIRROR_JOB = "checkpoint_mirror_job"
GROUP = "checkpoints"


class AuditConfig(Config):
    stale_after_s: float = 300.0
    # How long a key stays flagged (and no_checkpoint_regression failing) after another writer moved it back.
    external_window_s: float = 86_400.0


class MirrorConfig(Config):
    # A checkpoint_history row per mirrored advance (the audit trail of Redis-only consumers).
    # False halves the Postgres writes: for deployments whose acks already write history.
    record_history: bool = True
    batch_size: int = 5000
    # Undo foreign regressions (a store moved back by a write the project did not make) instead of
    # reporting them and leaving them as found. The operator's choice: another worker may have rewound
    # on purpose (see docs/durability-patterns.md, "Sharing checkpoints with other workers").
    repair: bool = False


def _schema(columns: dict[str, tuple[str, str]]) -> TableSchema:
    return TableSchema(columns=[TableColumn(name, type_, description=desc) for name, (type_, desc) in columns.items()])


def _consumer_lag(df: pd.DataFrame, consumers: Sequence[ConsumerConfig]) -> dict[str, float]:
    """Seconds since the last ack, per configured consumer (its worst key): a figure per consumer that
    Dagster plots, never a max over every key in the stores (a stale test key is not a late consumer)."""
    out: dict[str, float] = {}
    for cfg in consumers:
        mine = df[(df["adapter"] == cfg.adapter) & (df["stream"] == cfg.stream) & (df["grp"] == cfg.group)
                  & (df["consumer"] == cfg.consumer)] if not df.empty else df
        lag = pd.to_numeric(mine["lag_seconds"], errors="coerce") if not mine.empty else pd.Series(dtype=float)
        out[f"seconds_since_ack/{cfg.name}"] = float(lag.max()) if lag.notna().any() else 0.0
    return out


@asset(group_name=GROUP, kinds={"redis", "postgres"},
       description="Copy every Redis checkpoint into Postgres and restore missing/behind keys into Redis; "
                   "skip and report bad entries and foreign regressions.")
def checkpoint_mirror(context: AssetExecutionContext, config: MirrorConfig,
                      durability: DurabilityResource) -> MaterializeResult:
    client, db = durability.redis_client(), durability.postgres()
    report = CheckpointMirror(client, db, batch_size=config.batch_size, record_history=config.record_history,
                              repair=config.repair).run()
    cursors = CursorMirror(client, ConsumerStorage(db)).mirror_all()
    metrics = Metrics(Labels("mirror", "*"))
    metrics.call_duration("mirror.run", report.duration_s * 1000, adapter="mirror")
    for skipped in report.skipped[:20]:
        context.log.warning(f"skipped {skipped.where} {skipped.key}: {skipped.why} {skipped.detail}")
    return MaterializeResult(metadata={
        **report.as_metadata(), "cursors_mirrored": cursors,
        "skipped_entries": MetadataValue.json([x.as_dict() for x in report.skipped[:100]]),
    })


@asset(group_name=GROUP, kinds={"pandas", "postgres"}, deps=[checkpoint_mirror],
       description="Per key: advances over time, regressions (must be 0), foreign regressions, dead letters, "
                   "trimmed gaps.")
def checkpoint_history_summary(context: AssetExecutionContext, config: AuditConfig,
                               durability: DurabilityResource) -> MaterializeResult:
    db = durability.postgres()
    df = build_history_summary(db, window_s=config.external_window_s)
    persist(db, "checkpoint_history_summary", df, SUMMARY_COLUMNS)
    advances = int(df["advances_last_hour"].sum()) if not df.empty else 0
    failed = int(df["dead_letters"].sum()) if not df.empty else 0
    rate = round(advances / (advances + failed), 4) if advances + failed else 1.0
    return MaterializeResult(metadata={
        "dagster/column_schema": _schema(SUMMARY_COLUMNS),
        "dagster/row_count": len(df),
        "preview": MetadataValue.md(markdown_preview(df)),
        "regressions": int(df["regressions"].sum()) if not df.empty else 0,
        "external_regressions": int(df["external_regressions_recent"].sum()) if not df.empty else 0,
        "dead_letters": failed,
        "trimmed_gaps": int(df["trimmed_gaps"].sum()) if not df.empty else 0,
        ACK_SUCCESS_RATE: rate,
    })

def _read(durability: DurabilityResource, table: str) -> pd.DataFrame:
    with durability.postgres().connection() as conn:
        cur = conn.execute(f"SELECT * FROM {table}")  # noqa: S608 - fixed table names
        return pd.DataFrame(cur.fetchall(), columns=[c.name for c in cur.description or []])

def _keys(df: pd.DataFrame, limit: int = 5) -> str:
    names = [f"{r.adapter}:{r.stream}:{r.grp}:{r.consumer}" + (f":{r.shard}" if r.shard else "")
             for r in df.head(limit).itertuples()]
    return ", ".join(names) + (f" and {len(df) - limit} more" if len(df) > limit else "")

@asset_check(asset=checkpoint_history_summary, blocking=False,
             description="History never moves a checkpoint backwards: not by the project (must never "
                         "happen) and not by another worker within the audit window (operator --force moves "
                         "excepted).")
def no_checkpoint_regression(context: AssetCheckExecutionContext,
                             durability: DurabilityResource) -> AssetCheckResult:
    df = _read(durability, "checkpoint_history_summary")
    own = df[df["regressions"] > 0] if not df.empty else df
    foreign = df[df["external_regressions_recent"] > 0] if not df.empty else df
    problems = []
    if not own.empty:
        problems.append(f"{int(own['regressions'].sum())} regression(s) by the project's own writes on "
                        f"{_keys(own)}: this must never happen; keep the history rows and report it as a bug")
    if not foreign.empty:
        problems.append(f"{int(foreign['external_regressions_recent'].sum())} move(s) back by writes the project "
                        f"did not make, on {_keys(foreign)}: another worker lowered the checkpoint. The mirror "
                        "left it as found; see checkpoint_audit (status regressed-externally) and run "
                        "`durability-pipelines checkpoints repair <key>` if that write was wrong")
    return AssetCheckResult(passed=not problems, description="; ".join(problems) or None, metadata={
        "regressions": int(own["regressions"].sum()) if not own.empty else 0,
        "external_regressions": int(foreign["external_regressions_recent"].sum()) if not foreign.empty else 0,
        "keys": MetadataValue.md(markdown_preview(pd.concat([own, foreign]).drop_duplicates()))
        if problems else "none"})

@asset_check(asset="checkpoint_audit", description="Postgres within the hybrid bound (N acks or T seconds) of Redis.")
def drift_within_hybrid_bound(context: AssetCheckExecutionContext,
                              durability: DurabilityResource) -> AssetCheckResult:
    return _status_check(durability, "drifting", what="Postgres is behind Redis beyond the hybrid flush bound")

def _status_check(durability: DurabilityResource, status: str, *, what: str,
                  severity: AssetCheckSeverity = AssetCheckSeverity.ERROR) -> AssetCheckResult:
    """Pass when no audit row has ``status``; else say which keys and what to do (the rows' detail)."""
    df = _read(durability, "checkpoint_audit")
    bad = df[df["status"] == status] if not df.empty else df
    description = None
    if not bad.empty:
        description = f"{len(bad)} key(s) {what}: {_keys(bad)}. {bad.iloc[0]['detail']}"
    return AssetCheckResult(passed=bad.empty, severity=severity, description=description, metadata={
        f"{status.replace('-', '_')}_keys": len(bad),
        "detail": MetadataValue.md(markdown_preview(bad)) if not bad.empty else "none"})

@asset_check(asset="checkpoint_audit", description="No consumer with a backlog and no ack for too long.")
def no_stale_consumer(context: AssetCheckExecutionContext, durability: DurabilityResource) -> AssetCheckResult:
    return _status_check(durability, "stale", what="have a backlog and no ack for too long")

@asset_check(asset="checkpoint_audit", description="Open dead letters need an operator (warning).")
def no_dead_letters(context: AssetCheckExecutionContext, durability: DurabilityResource) -> AssetCheckResult:
    return _status_check(durability, "dead-lettered", what="are stopped by an open dead letter",
                         severity=AssetCheckSeverity.WARN)

@asset_check(asset="checkpoint_audit", description="Every stored checkpoint is a usable position: no garbage value, "
                                                  "no Redis key of another type, no key that cannot be parsed.")
def no_invalid_checkpoint_values(context: AssetCheckExecutionContext,
                                 durability: DurabilityResource) -> AssetCheckResult:
    df = _read(durability, "checkpoint_audit")
    bad = df[df["status"].isin(["invalid", "wrong-type", "unparseable"])] if not df.empty else df
    description = None
    if not bad.empty:
        description = (f"{len(bad)} key(s) hold no usable position: "
                       + "; ".join(f"{r.checkpoint_key} ({r.status}): {r.detail}" for r in bad.head(3).itertuples()))
    return AssetCheckResult(passed=bad.empty, description=description, metadata={
        "invalid_keys": int((bad["status"] == "invalid").sum()) if not bad.empty else 0,
        "wrong_type_keys": int((bad["status"] == "wrong-type").sum()) if not bad.empty else 0,
        "unparseable_keys": int((bad["status"] == "unparseable").sum()) if not bad.empty else 0,
        "detail": MetadataValue.md(markdown_preview(bad)) if not bad.empty else "none"})


@asset_check(asset="checkpoint_audit", description="No consumer's replication slot is invalidated or missing "
                                                  "(supabase_wal): such a consumer cannot read.")
def no_lost_replication_slot(context: AssetCheckExecutionContext, durability: DurabilityResource) -> AssetCheckResult:
    return _status_check(durability, "slot-lost", what="cannot read their replication slot")

@asset_check(asset="checkpoint_audit", description="No consumer's replication slot retains more WAL than its "
                                                  "max_retained_wal_mb (warning: the server's disk fills).")
def wal_retained_within_bound(context: AssetCheckExecutionContext, durability: DurabilityResource) -> AssetCheckResult:
    return _status_check(durability, "wal-retained", what="have a replication slot retaining more WAL than their "
                         "max_retained_wal_mb", severity=AssetCheckSeverity.WARN)


#: The audit's checks (``checkpoint_audit`` is built per code location, with its consumers).
AUDIT_CHECKS = [no_checkpoint_regression, drift_within_hybrid_bound, no_stale_consumer, no_dead_letters,
                no_invalid_checkpoint_values, no_lost_replication_slot, wal_retained_within_bound]


def build_audit_defs(consumers: Sequence[ConsumerConfig]) -> Definitions:
    """The mirror and audit assets, their checks, the mirror job (with every consumer's lag check) and
    its schedule. Only the audit table and the job depend on the consumers; the rest is module level."""

    @asset(group_name=GROUP, kinds={"pandas", "postgres"}, deps=[checkpoint_mirror],
           description="One row per checkpoint key: values per store, dispatched position, lag, drift, status.")
    def checkpoint_audit(context: AssetExecutionContext, config: AuditConfig,
                         durability: DurabilityResource) -> MaterializeResult:
        db = durability.postgres()
        # The replication slots of supabase_wal consumers (each opened on a runtime of its own, like the lag check).
        retained = measure_retained_log(consumers, lambda cfg: durability.runtime(cfg, migrate_schema=False))
        df = build_checkpoint_audit(durability.redis_client(), db, consumers,
                                    AuditThresholds(stale_after_s=config.stale_after_s,
                                                    external_window_s=config.external_window_s),
                                    retained=retained)
        persist(db, "checkpoint_audit", df, AUDIT_COLUMNS)
        counts = df["status"].value_counts().to_dict() if not df.empty else {}
        return MaterializeResult(metadata={
            "dagster/column_schema": _schema(AUDIT_COLUMNS),
            "dagster/row_count": len(df),
            "preview": MetadataValue.md(markdown_preview(df)),
            **_consumer_lag(df, consumers),
            **{f"retained_wal_bytes/{slot.consumer}": slot.backlog.retained_bytes for slot in retained.values()
               if slot.backlog is not None and slot.backlog.retained_bytes is not None},
            "largest_drift": MetadataValue.text(max((d for d in df["drift"] if d), key=int, default="0")),
            **{f"status_{k}": int(v) for k, v in counts.items()},
        })

    # The consumers' lag checks run with every mirror run: a missed objective shows within a minute.
    selection = AssetSelection.assets(checkpoint_mirror, checkpoint_audit, checkpoint_history_summary)
    if consumers:
        selection = selection | AssetSelection.checks(*(lag_check_key(cfg) for cfg in consumers))
    job = define_asset_job(
        MIRROR_JOB, selection=selection,
        description="Mirror Redis <-> Postgres, rebuild the audit tables, run their checks and every "
                    "consumer's lag check.",
        # One process for the whole run (the multiprocess default started a process per step, 8 per run,
        # and queued up behind itself under load), maintenance priority and concurrency (run_queue.py).
        executor_def=in_process_executor, tags=MAINTENANCE_RUN_TAGS,
    )

    @schedule(name="checkpoint_mirror_schedule", job=job, cron_schedule=os.environ.get(MIRROR_CRON_ENV, "* * * * *"),
              default_status=DefaultScheduleStatus.RUNNING,
              description="Runs the mirror and the audit; skips a tick while the previous run is queued or running.")
    def checkpoint_mirror_schedule(context: ScheduleEvaluationContext) -> RunRequest | SkipReason:
        busy = context.instance.get_runs(
            filters=RunsFilter(job_name=MIRROR_JOB, statuses=list(IN_FLIGHT_STATUSES)), limit=1)
        if busy:
            run = busy[0]
            return SkipReason(
                f"run {run.run_id} of {MIRROR_JOB} is still {run.status.value}: this tick is skipped so that "
                "mirror runs never pile up in the queue ahead of consumers")
        return RunRequest()

    return Definitions(
        assets=[checkpoint_mirror, checkpoint_audit, checkpoint_history_summary],
        asset_checks=AUDIT_CHECKS, jobs=[job], schedules=[checkpoint_mirror_schedule],
    )
