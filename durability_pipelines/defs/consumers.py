"""One factory: a consumer config -> a job (read_batch -> process_batch -> ack_and_checkpoint)
and a sensor that polls the stream from stored cursors.

The three ops are defined once and shared by every consumer's job; which
consumer a run serves is op config (set by the sensor), so the UI shows the
same three ops for every pipeline.
"""

# No `from __future__ import annotations`: Dagster resolves op parameter annotations at definition time.

from collections.abc import Sequence

from dagster import (
    Backoff,
    Config,
    DagsterRunStatus,
    DefaultSensorStatus,
    Failure,
    In,
    Jitter,
    JobDefinition,
    MetadataValue,
    OpExecutionContext,
    Out,
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

from durability_pipelines.checkpoints.errors import ConfigError, LeaseLostError
from durability_pipelines.consumer.config import ConsumerConfig
from durability_pipelines.consumer.dispatch import RunState, SensorCursor, plan_tick, shard_id
from durability_pipelines.consumer.handlers import load_handler
from durability_pipelines.consumer.runtime import (
    BatchDeadLettered,
    ProcessOutput,
    ReadOutput,
    ShardBusyError,
)
from durability_pipelines.defs.resources import DurabilityResource
from durability_pipelines.sources.errors import SourceError, StreamChangedError

SHARD_TAG = "durability/shard"
CONSUMER_TAG = "durability/consumer"
_REGISTRY: dict[str, ConsumerConfig] = {}
_IN_FLIGHT = {DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING,
              DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING, DagsterRunStatus.MANAGED}


def consumer_config(name: str) -> ConsumerConfig:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"no consumer named {name!r} in this code location (known: {sorted(_REGISTRY)}); "
            "check the op config or the files in durability_pipelines/consumers/"
        ) from None


class ReadBatchConfig(Config):
    consumer: str
    shard: str = ""  # empty = the unsharded change feed


def _run_finished(context: OpExecutionContext):
    def is_dead(owner: str) -> bool:
        run = context.instance.get_run_by_id(owner)
        return run is not None and run.is_finished

    return is_dead


@op(out=Out(ReadOutput), tags={"kind": "source"})
def read_batch(context: OpExecutionContext, config: ReadBatchConfig, durability: DurabilityResource) -> ReadOutput:
    """Take the shard's lease and read events after the acked checkpoint (up to max_events)."""
    cfg = consumer_config(config.consumer)
    if cfg.adapter == "dynamodb" and not config.shard:
        raise Failure(
            f"consumer {cfg.name} reads a sharded stream: set ops.read_batch.config.shard to a shard id "
            f"(the sensor {cfg.name}_sensor does this; its cursor lists the shards)", allow_retries=False)
    rt = durability.runtime(cfg, is_owner_dead=_run_finished(context))
    try:
        out = rt.read(config.shard or None, context.run_id)
    except ShardBusyError as exc:
        raise Failure(str(exc), allow_retries=False) from exc
    finally:
        rt.close()
    b = out.batch
    context.add_output_metadata({
        "consumer": cfg.name,
        "shard": shard_id(out.shard),
        "start_after": b.start_after or "(initial position)",
        "events": len(b.events),
        "first_sequence": b.events[0].sequence if b.events else "",
        "last_sequence": b.events[-1].sequence if b.events else "",
        "next_checkpoint": b.next_checkpoint or "",
        "shard_ended": b.shard_ended,
        "trimmed_gap": b.gap.reason if b.gap else "",
        "lease_epoch": out.lease.epoch if out.lease else 0,
        **rt.metrics.summary(),
    })
    return out


@op(ins={"read": In(ReadOutput)}, out=Out(ProcessOutput), tags={"kind": "handler"})
def process_batch(context: OpExecutionContext, read: ReadOutput, durability: DurabilityResource) -> ProcessOutput:
    """Call the consumer's handler on the events not yet acked; retried with backoff, then dead-lettered."""
    cfg = consumer_config(read.consumer)
    rt = durability.runtime(cfg, build_source=False)
    try:
        out = rt.process(read, retry_number=context.retry_number)
    except BatchDeadLettered as exc:
        raise Failure(str(exc), metadata={"dead_letter_id": exc.dead_letter_id}, allow_retries=False) from exc
    except LeaseLostError as exc:
        raise Failure(str(exc), allow_retries=False) from exc
    finally:
        rt.close()
    context.add_output_metadata({
        "processed": out.processed,
        "failed_items": len(out.failed),
        "dead_letters": MetadataValue.json(out.dead_letter_ids),
        "attempts": out.attempts,
        "ack_to": out.ack_to or "",
        **rt.metrics.summary(),
    })
    return out


@op(ins={"read": In(ReadOutput), "processed": In(ProcessOutput)}, tags={"kind": "checkpoint"})
def ack_and_checkpoint(context: OpExecutionContext, read: ReadOutput, processed: ProcessOutput,
                       durability: DurabilityResource) -> None:
    """Save the checkpoint under the lease (after the side effects committed) and release the lease."""
    cfg = consumer_config(read.consumer)
    rt = durability.runtime(cfg, build_source=False)
    try:
        result = rt.ack(read, processed)
    except LeaseLostError as exc:
        raise Failure(str(exc), allow_retries=False) from exc
    finally:
        rt.close()
    context.add_output_metadata({
        "checkpoint_key": rt.key(read.shard).redis_key,
        "checkpoint": result.current if result else (read.batch.start_after or ""),
        "outcome": result.outcome.value if result else "nothing to ack",
        "backend": cfg.checkpoint.backend,
        **rt.metrics.summary(),
    })


def build_consumer_job(cfg: ConsumerConfig) -> JobDefinition:
    retry = (
        RetryPolicy(max_retries=cfg.retry.max_retries, delay=cfg.retry.delay_s, backoff=Backoff.EXPONENTIAL,
                    jitter=Jitter.PLUS_MINUS)
        if cfg.retry.max_retries > 0
        else None
    )
    process = process_batch.with_retry_policy(retry) if retry else process_batch

    @job(
        name=f"{cfg.name}_job",
        description=cfg.description or f"{cfg.adapter} stream {cfg.stream}: read -> process -> ack",
        executor_def=in_process_executor,
        # The sensor re-dispatches failed batches from the acked checkpoint; a run-level retry
        # would re-run dead-lettered batches behind its back.
        tags={CONSUMER_TAG: cfg.name, "dagster/max_retries": "0"},
        config={"ops": {"read_batch": {"config": {"consumer": cfg.name, "shard": ""}}}},
    )
    def _consumer_job() -> None:
        read = read_batch()
        ack_and_checkpoint(read, process(read))

    return _consumer_job


def _run_state(context: SensorEvaluationContext, run_key: str) -> RunState:
    runs = context.instance.get_runs(filters=RunsFilter(tags={"dagster/run_key": run_key}), limit=1)
    if not runs:
        return RunState.MISSING
    status = runs[0].status
    if status in _IN_FLIGHT:
        return RunState.IN_PROGRESS
    return RunState.SUCCESS if status == DagsterRunStatus.SUCCESS else RunState.FAILURE


def build_consumer_sensor(cfg: ConsumerConfig, consumer_job: JobDefinition) -> SensorDefinition:
    sensor_name = f"{cfg.name}_sensor"

    @sensor(
        name=sensor_name,
        job=consumer_job,
        minimum_interval_seconds=cfg.sensor_interval_s,
        default_status=DefaultSensorStatus.RUNNING if cfg.sensor_running_by_default else DefaultSensorStatus.STOPPED,
        description=f"Polls {cfg.adapter} stream {cfg.stream} from the acked checkpoints; one run per shard.",
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
            acked_by_key = rt.store.load_many([rt.key(s) for s in known])
            acked = {s: acked_by_key[rt.key(s)] for s in known}
            stopped: dict[str, str] = {}

            def has_new(shard, after):
                try:
                    return rt.source.has_new(shard, after)
                except SourceError as exc:  # e.g. trimmed data under trim_policy 'fail': stop this shard only
                    stopped[shard_id(shard)] = str(exc)
                    context.log.error(f"shard {shard_id(shard)} stopped: {exc}")
                    return False

            plan = plan_tick(
                cfg.name, cursor,
                shards=rt.source.readable(acked),
                acked=acked,
                has_new=has_new,
                run_state=lambda key: _run_state(context, key),
                blocked=rt.storage.blocked_shards(cfg.name) if rt.storage else set(),
            )
        finally:
            rt.close()
        plan.skipped.update({sid: f"STOPPED: {why}" for sid, why in stopped.items()})
        new_cursor = plan.cursor.to_json()
        mirror.save(sensor_name, new_cursor)
        requests = [
            RunRequest(
                run_key=d.run_key,
                run_config={"ops": {"read_batch": {"config": {"consumer": cfg.name, "shard": d.shard or ""}}}},
                tags={SHARD_TAG: f"{cfg.name}:{shard_id(d.shard)}", CONSUMER_TAG: cfg.name,
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
