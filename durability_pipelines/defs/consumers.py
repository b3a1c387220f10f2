"""One factory: a consumer config -> a job (one op, ``drain_shard``) and a sensor that polls the
stream from stored cursors.

A run drains its shard: batch after batch (read -> process -> ack, the checkpoint saved after each),
until it is caught up or its budget is used (``consumer/drain.py``). The op is defined once and shared
by every consumer's job; which consumer and shard a run serves is op config (set by the sensor).
"""

# No `from __future__ import annotations`: Dagster resolves op parameter annotations at definition time.

import time
from collections.abc import Sequence

from dagster import (
    Backoff,
    Config,
    DagsterRunStatus,
    DefaultSensorStatus,
    Failure,
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
    in_process_executor,
    job,
    op,
    sensor,
)

from durability_pipelines.checkpoints.errors import (
    ConfigError,
    DurabilityError,
    LeaseLostError,
    StoreUnavailableError,
)
from durability_pipelines.consumer.config import ConsumerConfig
from durability_pipelines.consumer.dispatch import (
    InFlightRun,
    LeaseView,
    RunState,
    SensorCursor,
    dead_run_reason,
    plan_tick,
    shard_id,
)
from durability_pipelines.consumer.drain import DrainBudget, DrainReport, ShardDrainer
from durability_pipelines.consumer.handlers import load_handler
from durability_pipelines.consumer.runtime import BatchDeadLettered, ConsumerRuntime, ShardBusyError
from durability_pipelines.defs.resources import DurabilityResource
from durability_pipelines.defs.run_queue import CONSUMER_RUN_TAGS, IN_FLIGHT_STATUSES
from durability_pipelines.sources.errors import (
    SourceError,
    StreamChangedError,
    StreamUnavailableError,
    ThrottledError,
)
from durability_pipelines.sources.supabase_changes import ChangeFeedUnavailableError

SHARD_TAG = "durability/shard"
CONSUMER_TAG = "durability/consumer"
#: The op's per-run log keeps this many batch records in its output metadata (each batch is also logged).
BATCH_LOG_LIMIT = 200
#: Errors the op's RetryPolicy retries: the infrastructure, not the data or the config.
TRANSIENT_ERRORS = (StoreUnavailableError, StreamUnavailableError, ThrottledError, ChangeFeedUnavailableError)
_REGISTRY: dict[str, ConsumerConfig] = {}


def consumer_config(name: str) -> ConsumerConfig:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"no consumer named {name!r} in this code location (known: {sorted(_REGISTRY)}); "
            "check the op config or the files in durability_pipelines/consumers/"
        ) from None


class DrainShardConfig(Config):
    consumer: str
    shard: str = ""  # empty = the unsharded change feed


def _run_finished(context: OpExecutionContext):
    def is_dead(owner: str) -> bool:
        run = context.instance.get_run_by_id(owner)
        return run is not None and run.is_finished

    return is_dead


def _report_metadata(report: DrainReport) -> dict:
    return {**report.as_metadata(),
            "batch_log": MetadataValue.json([b.as_dict() for b in report.batches[-BATCH_LOG_LIMIT:]])}


@op(tags={"kind": "consumer"})
def drain_shard(context: OpExecutionContext, config: DrainShardConfig, durability: DurabilityResource) -> None:
    """Take the shard's lease and drain it: read -> process -> ack, batch after batch, the checkpoint
    saved after each, until caught up or the run's budget (max_batches_per_run, max_run_seconds) is used."""
    cfg = consumer_config(config.consumer)
    if cfg.adapter == "dynamodb" and not config.shard:
        raise Failure(
            f"consumer {cfg.name} reads a sharded stream: set ops.drain_shard.config.shard to a shard id "
            f"(the sensor {cfg.name}_sensor does this; its cursor lists the shards)", allow_retries=False)
    rt = durability.runtime(cfg, is_owner_dead=_run_finished(context))
    drainer = ShardDrainer(
        rt, config.shard or None, context.run_id, DrainBudget.from_config(cfg),
        on_batch=lambda record: context.log.info(record.describe()),
        on_retry=lambda attempt, exc, delay: context.log.warning(
            f"batch attempt {attempt} failed ({type(exc).__name__}: {exc}); retrying in {delay:.2f} s"),
    )
    try:
        report = drainer.run()
    except (ShardBusyError, LeaseLostError) as exc:
        raise Failure(str(exc), metadata=_report_metadata(drainer.report), allow_retries=False) from exc
    except BatchDeadLettered as exc:
        raise Failure(str(exc), metadata={**_report_metadata(drainer.report), "dead_letter_id": exc.dead_letter_id},
                      allow_retries=False) from exc
    except DurabilityError as exc:
        # A store or the stream down is retried by the op's RetryPolicy (from the acked checkpoint);
        # a wrong config, trimmed data under trim_policy 'fail', a changed stream are not: retrying
        # would only fail again later.
        if isinstance(exc, TRANSIENT_ERRORS):
            raise
        raise Failure(str(exc), metadata=_report_metadata(drainer.report), allow_retries=False) from exc
    finally:
        rt.close()
    context.log.info(
        f"drained {report.events} events in {len(report.batches)} batches ({report.events_per_s} events/s); "
        f"stopped: {report.stop_reason.value if report.stop_reason else '?'}; checkpoint {report.checkpoint}")
    context.add_output_metadata({**_report_metadata(report), "backend": cfg.checkpoint.backend,
                                 "checkpoint_key": rt.key(report.shard).redis_key, **rt.metrics.summary()})


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
        config={"ops": {"drain_shard": {"config": {"consumer": cfg.name, "shard": ""}}}},
    )
    def _consumer_job() -> None:
        drain()

    return _consumer_job


def _run_state(context: SensorEvaluationContext, run_key: str, cfg: ConsumerConfig, rt: ConsumerRuntime,
               shard: str | None) -> RunState:
    records = context.instance.get_run_records(filters=RunsFilter(tags={"dagster/run_key": run_key}), limit=1)
    if not records:
        return RunState.MISSING
    record = records[0]
    run = record.dagster_run
    if run.status in IN_FLIGHT_STATUSES:
        lease = rt.store.leases.get(rt.key(shard).lease_key)
        reason = dead_run_reason(
            InFlightRun(run.run_id, run.status.value, record.start_time),
            LeaseView(lease.owner, lease.expires_at.timestamp()) if lease and lease.expires_at else None,
            now=time.time(), lease_duration_s=cfg.lease_duration_s,
            run_budget_s=cfg.max_run_seconds + cfg.max_idle_s,
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


def build_consumer_sensor(cfg: ConsumerConfig, consumer_job: JobDefinition) -> SensorDefinition:
    sensor_name = f"{cfg.name}_sensor"

    @sensor(
        name=sensor_name,
        job=consumer_job,
        minimum_interval_seconds=cfg.sensor_interval_s,
        default_status=DefaultSensorStatus.RUNNING if cfg.sensor_running_by_default else DefaultSensorStatus.STOPPED,
        description=f"Polls {cfg.adapter} stream {cfg.stream} from the acked checkpoints; one draining run per shard.",
    )
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
            identity = getattr(rt.source, "identity", None)
            if cursor.stream_identity and identity and identity != cursor.stream_identity:
                raise StreamChangedError(
                    expected_label=cursor.stream_identity, actual_label=identity, table_name=cfg.stream,
                )
            cursor.stream_identity = identity or cursor.stream_identity
            known = list(dict.fromkeys([*listed, *(None if s == "-" else s for s in cursor.shards)]))
            blocked = rt.storage.blocked_shards(cfg.name) if rt.storage else set()
            acked, unusable = rt.load_acked(known, blocked=blocked, run_id=f"sensor:{sensor_name}")
            stopped: dict[str, str] = {shard_id(s): why for s, why in unusable.items()}
            for why in unusable.values():
                context.log.error(why)

            def has_new(shard, after):
                try:
                    return rt.source.has_new(shard, after)
                except SourceError as exc:  # e.g. trimmed data under trim_policy 'fail': stop this shard only
                    stopped[shard_id(shard)] = str(exc)
                    context.log.error(f"shard {shard_id(shard)} stopped: {exc}")
                    return False

            plan = plan_tick(
                cfg.name, cursor,
                shards=[s for s in rt.source.readable(acked) if s not in unusable],
                acked=acked,
                has_new=has_new,
                run_state=lambda key, shard: _run_state(context, key, cfg, rt, shard),
                blocked=blocked,
            )
        finally:
            rt.close()
        plan.skipped.update({sid: f"STOPPED: {why}" for sid, why in stopped.items()})
        new_cursor = plan.cursor.to_json()
        mirror.save(sensor_name, new_cursor)
        requests = [
            RunRequest(
                run_key=d.run_key,
                run_config={"ops": {"drain_shard": {"config": {"consumer": cfg.name, "shard": d.shard or ""}}}},
                tags={SHARD_TAG: f"{cfg.name}:{shard_id(d.shard)}", CONSUMER_TAG: cfg.name,
                      **CONSUMER_RUN_TAGS,
                      "durability/start_after": d.start_after or "INITIAL", "durability/attempt": str(d.attempt)},
            )
            for d in plan.dispatches
        ]
        skip = None if requests else "; ".join(f"{k}: {v}" for k, v in plan.skipped.items()) or "no shards"
        return SensorResult(run_requests=requests, cursor=new_cursor, skip_reason=skip)

    return _consumer_sensor


def validate_for_dagster(cfg: ConsumerConfig) -> None:
    """Fail definition loading (not the first tick) for configs that cannot work under Dagster."""
    if cfg.checkpoint.backend == "memory":
        raise ConfigError(
            f"consumer {cfg.name}: checkpoint backend 'memory' is process-local, and Dagster runs every batch "
            "in a new process, so the consumer would re-read its initial position forever. Use redis, "
            "postgres or hybrid (memory is for library use and single-process tests)."
        )
    load_handler(cfg.handler)  # a handler that does not import fails here, naming the dotted path


def build_consumer_defs(configs: Sequence[ConsumerConfig]) -> tuple[list[JobDefinition], list[SensorDefinition]]:
    jobs, sensors = [], []
    for cfg in configs:
        validate_for_dagster(cfg)
        _REGISTRY[cfg.name] = cfg
        consumer_job = build_consumer_job(cfg)
        jobs.append(consumer_job)
        sensors.append(build_consumer_sensor(cfg, consumer_job))
    return jobs, sensors
