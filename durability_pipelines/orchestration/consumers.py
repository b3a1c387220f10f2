"""One factory: a consumer config -> its Dagster definitions (``build_consumer_defs``), which the
``StreamConsumer`` component returns.

* a job of one op, ``drain_shard``: a run drains its set of shards (up to ``max_shards_per_run``, one
  thread each: ``consumer/shard_set.py``) batch after batch (read -> process -> ack, the checkpoint saved
  after each) until caught up or its budget is used and a successor took over (``consumer/drain.py``),
  and reports materializations of the consumer's sink per shard (an observation when it wrote nothing)
  with the shard's lag and throughput, which Dagster plots;
* a sensor that polls the stream from the acked checkpoints and packs the shards that need a run into
  runs (one run, and one successor, per set of shards);
* the sink as an asset downstream of the stream's (``stream_asset_spec``), and a check on it that
  fails when a shard's oldest unprocessed record is older than the consumer's ``max_lag_s``.
"""

# No `from __future__ import annotations`: Dagster resolves op parameter annotations at definition time.

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckKey,
    AssetCheckResult,
    AssetChecksDefinition,
    AssetKey,
    AssetMaterialization,
    AssetObservation,
    AssetSpec,
    Backoff,
    Config,
    DagsterExecutionInterruptedError,
    DagsterRunStatus,
    DefaultSensorStatus,
    Definitions,
    Failure,
    FreshnessPolicy,
    Jitter,
    JobDefinition,
    MetadataValue,
    OpExecutionContext,
    RetryPolicy,
    RunRequest,
    RunsFilter,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    asset_check,
    in_process_executor,
    job,
    op,
    sensor,
)
from pydantic import Field

from durability_pipelines.checkpoints.errors import (
    ConfigError,
    DurabilityError,
    LeaseLostError,
    StoreRefusedError,
    StoreUnavailableError,
)
from durability_pipelines.checkpoints.keys import NO_SHARD, shard_from_tag
from durability_pipelines.consumer.config import (
    SINK_MATERIALIZE_EVERY_S,
    ConsumerConfig,
    DynamoDBSourceConfig,
    KinesisSourceConfig,
)
from durability_pipelines.consumer.dispatch import (
    Dispatch,
    InFlightRun,
    LeaseView,
    RunState,
    SensorCursor,
    dead_run_reason,
    plan_tick,
    shard_id,
    shard_set_tag,
)
from durability_pipelines.consumer.drain import (
    BatchRecord,
    DrainBudget,
    DrainReport,
    StopReason,
)
from durability_pipelines.consumer.handlers import describe_sink, load_handler
from durability_pipelines.consumer.lag import explain_caught_up
from durability_pipelines.consumer.runtime import BatchDeadLettered, ConsumerRuntime, ShardBusyError
from durability_pipelines.consumer.shard_set import ShardOutcome, ShardSetDrainer
from durability_pipelines.observability import LAG_SECONDS, RECORDS_BEHIND
from durability_pipelines.orchestration.resources import DurabilityResource
from durability_pipelines.orchestration.run_queue import CONSUMER_RUN_TAGS, IN_FLIGHT_STATUSES
from durability_pipelines.orchestration.source_readiness import skip_when_source_not_ready
from durability_pipelines.orchestration.stream_observations import (
    measure_consumer_lag_and_refusals,
    observe_stream,
)
from durability_pipelines.services.errors import ServiceRefusedError
from durability_pipelines.sources.errors import (
    SourceError,
    StreamChangedError,
    StreamUnavailableError,
    ThrottledError,
)
from durability_pipelines.sources.supabase_changes import ChangeFeedUnavailableError

SHARD_TAG = "durability/shard"
CONSUMER_TAG = "durability/consumer"
#: On a successor run: the run key of the run it takes the shard over from by graceful hand-off.
SUCCESSOR_OF_TAG = "durability/successor_of"
#: On a run that owns several shards: their ids, comma-separated (the run's config has them too).
SHARDS_TAG = "durability/shards"
STREAMS_GROUP = "streams"
CONSUMERS_GROUP = "consumers"
LAG_CHECK = "lag_within_objective"
#: The job's metadata entry holding its consumer's config (what the op runs with; also shown in the UI).
CONFIG_METADATA = "durability/consumer_config"
#: The op's per-run log keeps this many batch records in its output metadata (each batch is also logged).
BATCH_LOG_LIMIT = 200
#: Errors the op's RetryPolicy retries: the infrastructure, not the data or the config.
TRANSIENT_ERRORS = (StoreUnavailableError, StreamUnavailableError, ThrottledError, ChangeFeedUnavailableError)


class DrainShardConfig(Config):
    consumer: str = Field(description="the consumer's name (must be this job's consumer)")
    shard: str = Field(default=NO_SHARD, description=f"the shard id; {NO_SHARD!r} = the unsharded change feed "
                       "('' is accepted too)")
    shards: list[str] = Field(default_factory=list, description="the shards of a run that owns several (the sensor "
                              "sets this when max_shards_per_run > 1); when given, `shard` is ignored")


def _run_finished(context: OpExecutionContext):
    def is_dead(owner: str) -> bool:
        run = context.instance.get_run_by_id(owner)
        return run is not None and run.is_finished

    return is_dead


def describe_claim(report: DrainReport) -> str:
    """The run's first log line about its shard: how it got it (by hand-off: from whom, at which checkpoint)."""
    sid, at = shard_id(report.shard), report.start_after or "(initial position)"
    waited = f" after waiting {report.handoff_waited_s:.3f} s" if report.handoff_waited_s else ""
    if report.claimed == "handed over":
        followed = (f"; it had followed the shard since {report.handoff_followed_s:.3f} s before the hand-off and "
                    "processes what it read at once" if report.handoff_followed_s is not None else "")
        return (f"took shard {sid} over from run {report.handed_from} by graceful hand-off{waited}, at checkpoint "
                f"{at} (lease epoch {report.lease_epoch}){followed}")
    how = {"free": "took the free lease", "released or expired": "took the lease its last holder released or "
           "let expire", "owner dead": "took the lease from a run that is no longer running"}.get(
        report.claimed, report.claimed)
    return f"shard {sid}: {how}{waited}; reading from checkpoint {at} (lease epoch {report.lease_epoch})"


def describe_hand_over(report: DrainReport) -> str:
    after = report.handoff_after_last_read_s
    return (f"handed shard {shard_id(report.shard)} over to run {report.handed_to} at checkpoint {report.checkpoint} "
            f"(lease epoch {(report.lease_epoch or 0) + 1})"
            + (f", {after:.3f} s after this run's last read" if after is not None else "")
            + (f" (flush {report.handoff_flush_s:.3f} s, hand-over write {report.handoff_write_s:.3f} s)"
               if report.handoff_flush_s is not None and report.handoff_write_s is not None else ""))


def _report_metadata(report: DrainReport) -> dict:
    return {**report.as_metadata(),
            "batch_log": MetadataValue.json([b.as_dict() for b in report.batches[-BATCH_LOG_LIMIT:]])}


def sink_event(cfg: ConsumerConfig, report: DrainReport, checkpoint_key: str
               ) -> AssetMaterialization | AssetObservation:
    """What the whole run did to the consumer's sink, per shard (the partition-like ``shard`` figure is text):
    a materialization when it wrote events, an observation when it wrote nothing (the lag still plots)."""
    figures = report.as_metadata()
    return _sink_event(cfg, checkpoint_key, shard=figures["shard"], events=report.events,
                       seconds=report.duration_s, batches=report.batch_count, last=report.last,
                       caught_up=report.behind == 0, stop_reason=figures["stop_reason"], checkpoint=report.checkpoint)


def _sink_event(cfg: ConsumerConfig, checkpoint_key: str, *, shard: str, events: int, seconds: float, batches: int,
                last: BatchRecord | None, caught_up: bool, stop_reason: str, checkpoint: str | None
                ) -> AssetMaterialization | AssetObservation:
    metadata = {
        "shard": shard,
        "events": events,
        "events_per_s": round(events / seconds, 1) if seconds > 0 else 0.0,
        # 0 once caught up: nothing is waiting, however old the newest record is.
        LAG_SECONDS: 0.0 if caught_up or last is None or last.lag_s is None else last.lag_s,
        RECORDS_BEHIND: 0 if caught_up else (last.behind if last is not None and last.behind is not None else -1),
        "batches": batches,
        "stop_reason": stop_reason,
        "checkpoint": checkpoint or "",
        "checkpoint_key": checkpoint_key,
    }
    key = sink_asset_key(cfg)
    if events:
        return AssetMaterialization(asset_key=key, metadata=metadata, description=f"{events} events from shard {shard}")
    return AssetObservation(asset_key=key, metadata=metadata, description=f"shard {shard}: nothing new to write")


class SinkReporter:
    """Materializes the consumer's sink as a run drains: at its first batch with events, then every
    ``SINK_MATERIALIZE_EVERY_S``, then once more for the rest when the run ends. A run lives ten minutes and
    hands its shard on; freshness, declarative automation and the plots must follow the stream, not the
    run's length. Each event covers the batches since the previous one (its lag is the lag right then)."""

    def __init__(self, cfg: ConsumerConfig, shard: str | None, checkpoint_key: str, emit, *,
                 clock=time.monotonic) -> None:
        self.cfg, self.shard, self.checkpoint_key, self.emit, self.clock = cfg, shard_id(shard), checkpoint_key, emit, clock
        self._start = clock()
        self._events = self._batches = 0
        self._last: BatchRecord | None = None
        self._emitted = False

    def batch(self, record: BatchRecord) -> bool:
        """Count a batch; True when it reported the sink."""
        self._events += record.events
        self._batches += 1
        self._last = record
        if self._events and (not self._emitted or self.clock() - self._start >= SINK_MATERIALIZE_EVERY_S):
            self._emit("draining", caught_up=record.behind == 0)
            return True
        return False

    def finish(self, report: DrainReport) -> None:
        """The rest of the run (or, for a run that wrote nothing at all, an observation of its lag)."""
        if self._events or not self._emitted:
            self._emit(report.as_metadata()["stop_reason"], caught_up=report.behind == 0, checkpoint=report.checkpoint)

    def _emit(self, stop_reason: str, *, caught_up: bool, checkpoint: str | None = None) -> None:
        last = self._last
        self.emit(_sink_event(
            self.cfg, self.checkpoint_key, shard=self.shard,
            events=self._events, seconds=self.clock() - self._start, batches=self._batches, last=last,
            caught_up=caught_up, stop_reason=stop_reason, checkpoint=checkpoint or (last.checkpoint if last else None)))
        self._emitted = True
        self._start, self._events, self._batches = self.clock(), 0, 0


def job_consumer_config(context: OpExecutionContext) -> ConsumerConfig:
    """The config of the consumer whose job runs this op: its component's attributes, carried by the job
    (``CONFIG_METADATA``), so the op never looks a consumer up by name."""
    raw = context.job_def.metadata.get(CONFIG_METADATA)
    if raw is None:
        raise Failure(f"job {context.job_def.name} carries no consumer config (metadata {CONFIG_METADATA}): "
                      "drain_shard runs only in the jobs StreamConsumer builds", allow_retries=False)
    return ConsumerConfig.model_validate(raw.value)


#: In a run of several shards, a shard's first batches are logged one by one; after that a line per shard each
#: time its sink is reported (``SINK_MATERIALIZE_EVERY_S``) sums them, so the event log grows with time, not with
#: shards x batches. A run of one shard logs every batch (the latency benchmark times hand-offs from them).
LOGGED_BATCHES_PER_SHARD = 20


class BatchLog:
    """Which batch records the op logs one by one (in a run of several shards: a shard's first
    ``LOGGED_BATCHES_PER_SHARD``, and every batch that retried, failed or dead-lettered), and the sum of the
    others per shard."""

    def __init__(self, log, *, per_shard: float = LOGGED_BATCHES_PER_SHARD) -> None:
        self.log = log
        self.per_shard = per_shard
        self._logged: dict = {}
        self._quiet: dict = {}  # shard -> [batches, events, first record, last record] not logged one by one

    def batch(self, record: BatchRecord) -> None:
        n = self._logged.get(record.shard, 0)
        if n < self.per_shard or record.attempts > 1 or record.failed or record.dead_letter_ids:
            self._logged[record.shard] = n + 1
            self.log.info(record.describe())
            return
        quiet = self._quiet.setdefault(record.shard, [0, 0, record, record])
        quiet[0] += 1
        quiet[1] += record.events
        quiet[3] = record

    def summarize(self, shard) -> None:
        quiet = self._quiet.pop(shard, None)
        if quiet is None:
            return
        batches, events, first, last = quiet
        lag = f"{last.lag_s:.1f} s" if last.lag_s is not None else "unknown"
        self.log.info(f"batches {first.index}-{last.index} shard {shard_id(shard)}: {batches} batches, {events} events "
                      f"(not logged one by one; see batch_log); checkpoint at {last.checkpoint}; lag {lag}, "
                      f"behind {last.behind if last.behind is not None else 'unknown'}")


def _restartable(exc: BaseException) -> bool:
    """Errors after which a shard of a multi-shard run is restarted in place: the infrastructure (what the op's
    RetryPolicy retries for a run of one shard), or a bug/crash outside the project's errors."""
    if isinstance(exc, StoreRefusedError):  # credentials or a database: not an outage
        return False
    return isinstance(exc, TRANSIENT_ERRORS) or not isinstance(exc, DurabilityError)


def _raise_for(exc: BaseException, metadata: dict) -> None:
    """A run of one shard fails as it always has: retried by the op's RetryPolicy for the infrastructure,
    not for the data, the config or a lost lease."""
    if isinstance(exc, (ShardBusyError, LeaseLostError, StoreRefusedError)):
        raise Failure(str(exc), metadata=metadata, allow_retries=False) from exc
    if isinstance(exc, BatchDeadLettered):
        raise Failure(str(exc), metadata={**metadata, "dead_letter_id": exc.dead_letter_id},
                      allow_retries=False) from exc
    if isinstance(exc, DurabilityError) and not isinstance(exc, TRANSIENT_ERRORS):
        # A wrong config, trimmed data under trim_policy 'fail', a changed stream: retrying would fail again.
        raise Failure(str(exc), metadata=metadata, allow_retries=False) from exc
    raise exc


def run_metadata(outcomes: list[ShardOutcome]) -> dict:
    """The op's output metadata: a run of one shard reports its drain; a run of several sums them (numbers
    Dagster plots) and lists each shard (which shard is behind stays visible)."""
    reports = [o.report for o in outcomes]
    if len(reports) == 1:
        return _report_metadata(reports[0])
    figures = [r.as_metadata() for r in reports]
    summed = ("batches", "events", "processed", "failed_items", "events_filtered", "retried_batches", "dead_letters")
    for outcome, f in zip(outcomes, figures, strict=True):  # a restarted shard's earlier drains count too
        for earlier in (r.as_metadata() for r in outcome.earlier):
            f.update({k: f[k] + earlier[k] for k in summed})
    total = {k: sum(f[k] for f in figures) for k in summed}
    duration = max(r.duration_s for r in reports)
    behind = [f["records_behind"] for f in figures]
    reasons = sorted({f["stop_reason"] for f in figures})
    per_shard = ["| shard | stop | batches | events | checkpoint | lag (s) | behind | claimed | handed to |",
                 "|---|---|---|---|---|---|---|---|---|"] + [
        f"| {f['shard']} | {f['stop_reason']} | {f['batches']} | {f['events']} | {f['checkpoint']} | "
        f"{f['lag_seconds']} | {f['records_behind']} | {f['claimed']} | {f['handed_to']} |" for f in figures]
    per = max(1, BATCH_LOG_LIMIT // len(reports))
    return {
        "consumer": figures[0]["consumer"], "shard": ", ".join(f["shard"] for f in figures), "shards": len(reports),
        **total, "stop_reason": reasons[0] if len(reasons) == 1 else ", ".join(reasons),
        "events_per_s": round(total["events"] / duration, 1) if duration > 0 else 0.0,
        "duration_s": round(duration, 3),
        "lag_seconds": max(f["lag_seconds"] for f in figures),
        "records_behind": -1 if -1 in behind else sum(behind),
        "shards_handed_over": sum(bool(r.handed_to) for r in reports),
        "per_shard": MetadataValue.md("\n".join(per_shard)),
        "batch_log": MetadataValue.json([b.as_dict() for r in reports for b in r.batches[-per:]]),
    }


@op(tags={"kind": "consumer"})
def drain_shard(context: OpExecutionContext, config: DrainShardConfig, durability: DurabilityResource) -> None:
    """Take the shards' leases and drain them, each on its own thread: read -> process -> ack, batch after
    batch, the checkpoint saved after each, until caught up or the run's budget (max_batches_per_run,
    max_run_seconds) is used and a successor has taken over; then report what the run did to the consumer's
    sink (a materialization per shard, or an observation)."""
    cfg = job_consumer_config(context)
    if config.consumer != cfg.name:
        raise Failure(f"this is the job of consumer {cfg.name}; ops.drain_shard.config.consumer is "
                      f"{config.consumer!r}: launch {config.consumer}_job instead", allow_retries=False)
    shards = [shard_from_tag(s) for s in config.shards] or [shard_from_tag(config.shard)]
    if cfg.adapter == "dynamodb" and None in shards:
        raise Failure(
            f"consumer {cfg.name} reads a sharded stream: set ops.drain_shard.config.shard to a shard id "
            f"(the sensor {cfg.name}_sensor does this; its cursor lists the shards)", allow_retries=False)
    several = len(shards) > 1
    try:
        rt = durability.runtime(cfg, is_owner_dead=_run_finished(context))
    except (StoreRefusedError, ServiceRefusedError) as exc:  # credentials, a database: retrying will not help
        raise Failure(str(exc), allow_retries=False) from exc
    sinks = {s: SinkReporter(cfg, s, rt.key(s).redis_key, context.log_event) for s in shards}
    batch_log = BatchLog(context.log, per_shard=LOGGED_BATCHES_PER_SHARD if several else float("inf"))

    def on_batch(record: BatchRecord) -> None:
        batch_log.batch(record)
        if sinks[record.shard].batch(record):
            batch_log.summarize(record.shard)

    def on_retry(shard, attempt: int, exc: BaseException, delay: float) -> None:
        context.log.warning(f"batch attempt {attempt} failed ({type(exc).__name__}: {exc}); retrying in {delay:.2f} s"
                            + (f" (shard {shard_id(shard)})" if several else ""))

    def on_restart(shard, restarts: int, exc: BaseException, delay: float) -> None:
        context.log.warning(f"shard {shard_id(shard)}: its drain failed ({type(exc).__name__}: {exc}); restarting it "
                            f"in {delay:.1f} s (restart {restarts} of {cfg.retry.max_retries}); the run's other shards "
                            "go on")

    drainer = ShardSetDrainer(
        rt, shards, context.run_id, DrainBudget.from_config(cfg),
        on_start=lambda report: context.log.info(describe_claim(report)),
        on_batch=on_batch, on_retry=on_retry, on_restart=on_restart, restartable=_restartable)
    refused: dict[str, str] = {}
    try:
        outcomes = drainer.run()
        refused = rt.store.refusals()  # hybrid went on without a part whose server refused it: say so
    except (DagsterExecutionInterruptedError, KeyboardInterrupt) as exc:
        # Terminate in the UI, a SIGTERM: every shard finished and acked its batch in hand and released its
        # lease (ShardSetDrainer.run); the runtime's close below flushes the hybrid store. Dagster retries an
        # interrupted op under its RetryPolicy, which would take the shards again: a stop is not retried.
        raise Failure("run stopped (canceled or terminated): each shard acked its batch in hand and released its "
                      "lease; the sensor dispatches them again", allow_retries=False) from exc
    finally:
        rt.close()
    metadata = run_metadata(outcomes)
    if not several and outcomes[0].error is not None:
        _raise_for(outcomes[0].error, metadata)
    is_successor = SUCCESSOR_OF_TAG in context.run.tags
    problems = []
    for outcome in outcomes:
        report, sid = outcome.report, shard_id(outcome.shard)
        if outcome.error is not None:
            problems.append(f"shard {sid}: {type(outcome.error).__name__}: {outcome.error}")
            continue
        if report.stop_reason is StopReason.NOT_GRANTED:
            if not is_successor:  # a run the sensor dispatched for a free shard: an anomaly
                problems.append(f"shard {sid} not taken: {report.not_granted}. This run changed nothing on it; the "
                                "sensor dispatches the shard again.")
            else:
                context.log.info(f"shard {sid} not taken: {report.not_granted}")  # a successor: a normal end
            continue
        batch_log.summarize(outcome.shard)
        context.log.info(
            f"{'shard ' + sid + ': ' if several else ''}drained {report.events} events in {report.batch_count} "
            f"batches ({report.events_per_s} events/s); stopped: {report.stop_reason.value if report.stop_reason else '?'}"
            f"; checkpoint {report.checkpoint}")
        if report.handed_to:
            context.log.info(describe_hand_over(report))
        sinks[outcome.shard].finish(report)
    checkpoint_keys = (rt.key(shards[0]).redis_key if not several
                       else MetadataValue.json([rt.key(s).redis_key for s in shards]))
    if problems:
        raise Failure(f"{len(problems)} of {len(outcomes)} shard(s) of this run failed"
                      + (" (the others drained normally)" if several and len(problems) < len(outcomes) else "")
                      + ": " + "; ".join(problems),
                      metadata={**metadata, "checkpoint_key": checkpoint_keys}, allow_retries=False)
    for part, why in refused.items():
        context.log.warning(f"the {part} part of the {cfg.checkpoint.backend} checkpoint store refused this run, "
                            f"which went on with the other part alone (no ack lost; the lag check fails until it is "
                            f"fixed): {why}")
    if refused:
        metadata["checkpoint_store_refused"] = MetadataValue.json(refused)
    context.add_output_metadata({**metadata, "backend": cfg.checkpoint.backend,
                                 "checkpoint_key": checkpoint_keys, **rt.metrics.summary()})


def build_consumer_job(cfg: ConsumerConfig) -> JobDefinition:
    # Handler failures are retried batch by batch inside the run (retry.max_retries, then dead-lettered);
    # this policy covers the run's own infrastructure (a store or the stream down): the op starts again
    # from the acked checkpoint.
    retry = RetryPolicy(max_retries=cfg.retry.max_retries, delay=cfg.retry.delay_s, backoff=Backoff.EXPONENTIAL,
                        jitter=Jitter.PLUS_MINUS) if cfg.retry.max_retries > 0 else None
    drain = drain_shard.with_retry_policy(retry) if retry else drain_shard

    @job(
        name=f"{cfg.name}_job",
        description=cfg.description or f"{cfg.adapter} stream {cfg.stream}: drain a shard (read -> process -> ack)",
        # One process per run: the op runs in the run worker, its clients opened once.
        executor_def=in_process_executor,
        # The sensor re-dispatches failed runs from the acked checkpoint; a run-level retry
        # would re-run dead-lettered batches behind its back.
        tags={CONSUMER_TAG: cfg.name, "dagster/max_retries": "0", **CONSUMER_RUN_TAGS},
        config={"ops": {"drain_shard": {"config": {"consumer": cfg.name, "shard": NO_SHARD}}}},
        metadata={CONFIG_METADATA: MetadataValue.json(cfg.model_dump(mode="json"))},
    )
    def _consumer_job() -> None:
        drain()

    return _consumer_job


def run_budget_s(cfg: ConsumerConfig) -> float:
    """The longest a live run executes: a successor's wait for the hand-off, its budget, the wait for its
    own successor past the budget, and the idle polling of a caught-up run."""
    return cfg.max_run_seconds + 2 * cfg.handoff_timeout_s + (0.0 if cfg.keep_owned else cfg.max_idle_s)


def _run_record(context: SensorEvaluationContext, run_key: str, seen: dict):
    if run_key not in seen:
        records = context.instance.get_run_records(filters=RunsFilter(tags={"dagster/run_key": run_key}), limit=1)
        seen[run_key] = records[0] if records else None
    return seen[run_key]


def successor_due_after_s(cfg: ConsumerConfig) -> float:
    """How long after a run started its successor is started: ``successor_lead_s`` before its budget ends,
    but never in the first half of it (a lead longer than the budget would hand the shard on at once)."""
    return max(cfg.max_run_seconds - cfg.successor_lead_s, cfg.max_run_seconds / 2)


def _successor_due(context: SensorEvaluationContext, run_key: str, cfg: ConsumerConfig, seen: dict) -> bool:
    record = _run_record(context, run_key, seen)
    started = record.start_time if record is not None else None
    return started is not None and time.time() - started >= successor_due_after_s(cfg)


def _run_state(context: SensorEvaluationContext, run_key: str, cfg: ConsumerConfig, rt: ConsumerRuntime,
               shard: str | None, seen: dict) -> RunState:
    record = _run_record(context, run_key, seen)
    if record is None:
        return RunState.MISSING
    run = record.dagster_run
    if run.status in IN_FLIGHT_STATUSES:
        lease = rt.store.leases.get(rt.key(shard).lease_key)
        reason = dead_run_reason(
            InFlightRun(run.run_id, run.status.value, record.start_time),
            LeaseView(lease.owner, lease.expires_at.timestamp()) if lease and lease.expires_at else None,
            now=time.time(), lease_duration_s=cfg.lease_duration_s,
            run_budget_s=run_budget_s(cfg),
        )
        if reason is None:
            return RunState.IN_PROGRESS
        # Mark it failed (Dagster's run monitoring cannot see a worker whose node died): that frees the
        # shard's run slot, and the shard is re-dispatched from the acked checkpoint right away.
        context.log.warning(f"{reason}; marking it failed and re-dispatching shard {shard_id(shard)}")
        context.instance.report_run_failed(run, message=f"durability_pipelines: {reason}. The sensor "
                                           f"{cfg.name}_sensor re-dispatches the shard from its acked checkpoint.")
        return RunState.FAILURE
    return RunState.SUCCESS if run.status == DagsterRunStatus.SUCCESS else RunState.FAILURE


def run_request(cfg: ConsumerConfig, d: Dispatch) -> RunRequest:
    """The run of a dispatch: one shard (``shard``) or several (``shards``); the queue's per-shard limit is
    per shard set (``SHARD_TAG``), so an owner and its successor may run side by side."""
    ids = [shard_id(s) for s in d.shards]
    op_config = {"consumer": cfg.name, "shard": ids[0]} if len(ids) == 1 else {"consumer": cfg.name, "shards": ids}
    return RunRequest(
        run_key=d.run_key,
        run_config={"ops": {"drain_shard": {"config": op_config}}},
        tags={SHARD_TAG: shard_set_tag(cfg.name, d.shards), CONSUMER_TAG: cfg.name, **CONSUMER_RUN_TAGS,
              "durability/start_after": d.start_after or "INITIAL", "durability/attempt": str(d.attempt),
              **({SHARDS_TAG: ",".join(ids)} if len(ids) > 1 else {}),
              **({SUCCESSOR_OF_TAG: d.successor_of} if d.successor_of else {})},
    )


#: Shards a sensor tick peeks at in parallel (each peek: a GetShardIterator and a GetRecords, or one query).
PEEK_THREADS = 16


def peek_shards(source, shards: list, acked) -> dict:
    """shard -> (has new records, the SourceError that stopped it or None), on up to ``PEEK_THREADS`` threads
    (the sources' clients are thread-safe; their per-shard state is keyed by shard). Logs nothing: the
    sensor's context belongs to its own thread."""
    def peek(shard):
        try:
            return shard, (source.has_new(shard, acked.get(shard)), None)
        except SourceError as exc:
            return shard, (False, exc)

    if len(shards) <= 1:
        return dict(peek(s) for s in shards)
    with ThreadPoolExecutor(max_workers=min(PEEK_THREADS, len(shards)), thread_name_prefix="peek") as pool:
        return dict(pool.map(peek, shards))


def build_consumer_sensor(cfg: ConsumerConfig, consumer_job: JobDefinition) -> SensorDefinition:
    sensor_name = f"{cfg.name}_sensor"

    @sensor(
        name=sensor_name,
        job=consumer_job,
        minimum_interval_seconds=cfg.sensor_interval_s,
        default_status=DefaultSensorStatus.RUNNING if cfg.sensor_running_by_default else DefaultSensorStatus.STOPPED,
        description=f"Polls {cfg.adapter} stream {cfg.stream} from the acked checkpoints; runs of up to "
                    f"{cfg.max_shards_per_run} shards each drain them.",
    )
    @skip_when_source_not_ready(cfg)
    @observe_stream(cfg, stream_asset_key(cfg), sink_asset_key(cfg))
    def _consumer_sensor(context: SensorEvaluationContext, durability: DurabilityResource) -> SensorResult:
        mirror = durability.cursor_mirror()
        raw, origin = context.cursor, "dagster"
        if not raw:
            raw, origin = mirror.load(sensor_name)
            if raw:
                context.log.info(f"restored the cursor from the {origin} mirror")
        cursor = SensorCursor.from_json(raw)
        rt = durability.runtime(cfg)
        try:
            listed = rt.source.list_shards()
            identity = rt.source.identity
            if cursor.stream_identity and identity and identity != cursor.stream_identity:
                raise StreamChangedError(
                    expected_label=cursor.stream_identity, actual_label=identity, table_name=cfg.stream,
                )
            cursor.stream_identity = identity or cursor.stream_identity
            known = list(dict.fromkeys([*listed, *(shard_from_tag(s) for s in cursor.shards)]))
            blocked = rt.storage.blocked_shards(cfg.name) if rt.storage else set()
            acked, unusable = rt.load_acked(known, blocked=blocked, run_id=f"sensor:{sensor_name}")
            stopped: dict[str, str] = {shard_id(s): why for s, why in unusable.items()}
            for why in unusable.values():
                context.log.error(why)

            readable = [s for s in rt.source.readable(acked) if s not in unusable]
            # The shards no run holds are peeked at together, on threads: a consumer with hundreds of shards
            # must tick well inside Dagster's sensor timeout (a peek is a round trip or two to the stream).
            unowned = [s for s in readable if not getattr(cursor.shards.get(shard_id(s)), "run_key", None)]
            peeked = peek_shards(rt.source, unowned, acked)

            def has_new(shard, after):
                found, error = peeked[shard] if shard in peeked and acked.get(shard) == after else peek_shards(
                    rt.source, [shard], {shard: after})[shard]
                if error is not None:  # e.g. trimmed data under trim_policy 'fail': stop this shard only
                    stopped[shard_id(shard)] = str(error)
                    context.log.error(f"shard {shard_id(shard)} stopped: {error}")
                return found

            seen: dict = {}  # run records read this tick, by run key
            plan = plan_tick(
                cfg.name, cursor,
                shards=readable,
                acked=acked,
                has_new=has_new,
                run_state=lambda key, shard: _run_state(context, key, cfg, rt, shard, seen),
                blocked=blocked,
                successor_due=lambda key, shard: _successor_due(context, key, cfg, seen),
                max_shards_per_run=cfg.max_shards_per_run,
            )
            # "caught up" is not the whole truth when the feed is held back (an open transaction): name it
            plan.skipped.update(explain_caught_up(rt.source, plan.skipped, acked))
        finally:
            rt.close()
        plan.skipped.update({sid: f"STOPPED: {why}" for sid, why in stopped.items()})
        new_cursor = plan.cursor.to_json()
        mirror.save(sensor_name, new_cursor)
        requests = [run_request(cfg, d) for d in plan.dispatches]
        skip = None if requests else "; ".join(f"{k}: {v}" for k, v in plan.skipped.items()) or "no shards"
        return SensorResult(run_requests=requests, cursor=new_cursor, skip_reason=skip)

    return _consumer_sensor


def validate_for_dagster(cfg: ConsumerConfig, path: Path | None = None) -> None:
    """Fail definition loading (not the first tick) for configs that cannot work under Dagster,
    naming the file."""
    where = f"consumer config {path}" if path else f"consumer {cfg.name}"
    if cfg.checkpoint.backend == "memory":
        raise ConfigError(
            f"{where}: attributes.checkpoint.backend 'memory' is process-local, and Dagster runs every batch "
            "in a new process, so the consumer would re-read its initial position forever. Use redis, "
            "postgres or hybrid (memory is for library use and single-process tests)."
        )
    try:
        load_handler(cfg.handler)  # a handler that does not import fails here, naming the dotted path
    except ConfigError as exc:
        raise ConfigError(f"{where}: attributes.handler: {exc}") from None


def stream_asset_key(cfg: ConsumerConfig) -> AssetKey:
    return AssetKey(["streams", cfg.adapter, cfg.stream])


def stream_asset_spec(cfg: ConsumerConfig) -> AssetSpec:
    """The stream a consumer reads: an external asset (Dagster observes it, never materializes it).
    Consumers of the same stream share it (``definitions.py`` declares each once)."""
    source = cfg.source
    if isinstance(source, KinesisSourceConfig):
        description = (f"Kinesis data stream {source.stream_name!r} (the Kinesis destination of DynamoDB table "
                       f"{source.table!r}) in {source.region}")
        metadata = {"table": source.table, "region": source.region, "stream_name": source.stream_name}
    elif isinstance(source, DynamoDBSourceConfig):
        description = f"DynamoDB Streams stream of table {source.table!r} in {source.region}"
        metadata = {"table": source.table, "region": source.region}
    else:
        description = (f"Change feed {source.channel!r}: changes of {source.table} captured into "
                       f"{source.change_log} (Postgres / Supabase)")
        metadata = {"channel": source.channel, "table": source.table, "change_log": source.change_log}
    return AssetSpec(stream_asset_key(cfg), description=description, kinds={cfg.adapter},
                     group_name=STREAMS_GROUP, metadata=metadata)


def sink_asset_key(cfg: ConsumerConfig) -> AssetKey:
    """``<consumer>/<consumer>_<sink>``. The asset graph labels a node with its key's last part only:
    consumers writing the same sink (``stream_events``) would be identical boxes side by side."""
    return AssetKey([cfg.name, f"{cfg.name}_{describe_sink(cfg.handler, cfg.handler_options, cfg.stream).name}"])


def sink_asset_spec(cfg: ConsumerConfig) -> AssetSpec:
    sink = describe_sink(cfg.handler, cfg.handler_options, cfg.stream)
    return AssetSpec(
        sink_asset_key(cfg), deps=[stream_asset_key(cfg)], kinds=set(sink.kinds), group_name=CONSUMERS_GROUP,
        description=f"{sink.description}. Written by consumer {cfg.name} (job {cfg.name}_job) from "
                    f"{cfg.adapter} stream {cfg.stream}; each run reports the shard's events, lag and events/s.",
        metadata={"consumer": cfg.name, "handler": cfg.handler, "max_lag_s": cfg.max_lag_s},
        freshness_policy=sink_freshness_policy(cfg),
    )


def sink_freshness_policy(cfg: ConsumerConfig) -> FreshnessPolicy | None:
    """The sink's freshness as Dagster evaluates it (the freshness daemon, ``freshness: enabled`` in
    dagster.yaml): materialized within ``max_lag_s`` + 60 s, or the consumer's own windows."""
    if cfg.freshness is None or not cfg.freshness.enabled:
        return None
    fail, warn = cfg.freshness.windows(cfg.max_lag_s)
    return FreshnessPolicy.time_window(fail_window=timedelta(seconds=fail),
                                       warn_window=timedelta(seconds=warn) if warn is not None else None)


def lag_check_key(cfg: ConsumerConfig) -> AssetCheckKey:
    return AssetCheckKey(sink_asset_key(cfg), LAG_CHECK)


def build_lag_check(cfg: ConsumerConfig) -> AssetChecksDefinition:
    @asset_check(
        asset=sink_asset_key(cfg), name=LAG_CHECK, blocking=False,
        description=f"Every shard's oldest unprocessed record is at most max_lag_s ({cfg.max_lag_s:g} s) old: "
                    f"consumer {cfg.name} keeps up with its stream (0 when nothing is waiting).",
    )
    def _lag_check(context: AssetCheckExecutionContext, durability: DurabilityResource) -> AssetCheckResult:
        try:
            lags, refused = measure_consumer_lag_and_refusals(durability, cfg)
        except DurabilityError as exc:  # the stream or a store down: unknown is not "within the objective"
            return AssetCheckResult(passed=False, description=f"cannot measure consumer {cfg.name}'s lag: "
                                    f"{type(exc).__name__}: {exc}", metadata={"max_lag_s": cfg.max_lag_s})
        late = [x for x in lags if x.lag_s is not None and x.lag_s > cfg.max_lag_s]
        unknown = [x for x in lags if x.lag_s is None]
        worst = max((x.lag_s for x in lags if x.lag_s is not None), default=0.0)
        problems = []
        if late:
            problems.append(
                f"{len(late)} shard(s) behind the objective of {cfg.max_lag_s:g} s: "
                + "; ".join(x.describe() for x in sorted(late, key=lambda x: -(x.lag_s or 0))[:5])
                + f". Is {cfg.name}_sensor running, are its runs failing or queued (Runs, tag "
                  f"{CONSUMER_TAG}={cfg.name}), is an open dead letter stopping a shard? See docs/operations.md")
        if unknown:
            problems.append(f"{len(unknown)} shard(s) whose lag cannot be measured: "
                            + "; ".join(x.describe() for x in unknown[:5]))
        for part, why in refused.items():
            problems.append(f"its {cfg.checkpoint.backend} checkpoint store runs without its {part} part, whose "
                            f"server refused it (the consumer goes on, no ack lost, but not as configured): {why}")
        return AssetCheckResult(
            passed=not problems, description="; ".join(problems) or
            f"{len(lags)} shard(s), worst lag {worst:.1f} s (objective {cfg.max_lag_s:g} s)",
            metadata={LAG_SECONDS: worst, "max_lag_s": cfg.max_lag_s, "shards": len(lags),
                      "shards_late": len(late), "shards_unknown": len(unknown),
                      **_bytes_figures(lags),
                      "per_shard": MetadataValue.md("\n".join(
                          ["| shard | lag (s) | WAL behind (bytes) | acked | last ack | problem |",
                           "|---|---|---|---|---|---|"]
                          + [f"| {shard_id(x.shard)} | {'' if x.lag_s is None else x.lag_s} | "
                             f"{'' if x.lag_bytes is None else x.lag_bytes} | {x.acked or ''} | "
                             f"{x.last_ack_at.isoformat(timespec='seconds') if x.last_ack_at else ''} | "
                             f"{x.problem or ''} |" for x in lags[:50]]))},
        )

    return _lag_check


def _bytes_figures(lags: list) -> dict:
    """A source that counts its backlog in bytes (the WAL feed): the worst shard's, plotted beside the seconds."""
    told = [x.lag_bytes for x in lags if x.lag_bytes is not None]
    return {"reactive.lag_bytes": max(told)} if told else {}


def build_consumer_defs(cfg: ConsumerConfig) -> Definitions:
    """A consumer's definitions: its job, sensor, sink asset and lag check (the stream's asset is
    declared once per stream by the code location, ``definitions.py``)."""
    from durability_pipelines.orchestration.rollups import build_rollup_defs

    validate_for_dagster(cfg)
    consumer_job = build_consumer_job(cfg)
    return Definitions.merge(
        Definitions(jobs=[consumer_job], sensors=[build_consumer_sensor(cfg, consumer_job)],
                    assets=[sink_asset_spec(cfg)], asset_checks=[build_lag_check(cfg)]),
        build_rollup_defs(cfg, sink_key=sink_asset_key(cfg), group_name=CONSUMERS_GROUP))
