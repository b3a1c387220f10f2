"""The consumer sensor observes its stream asset (and its sink's lag) at a bounded rate.

Without this, ``streams/<adapter>/<stream>`` shows "Latest event –" forever, and the sink's
``reactive.lag_seconds`` plot is 0 at every point: a run reports its lag when it ends, and a run ends
caught up (or at its budget). The lag that matters is the one while records wait, which only an
observer between runs sees.

So at most once per ``OBSERVE_EVERY_S`` per consumer (not at every 4-s tick: the Dagster event log
must not grow with the tick rate), the sensor measures the consumer's lag (``consumer/lag.py``: the
shards, the acked position of each, the age of the oldest record waiting) and returns, through
``SensorResult(asset_events=...)``:

* an ``AssetObservation`` of the stream asset: shards, per-shard acked positions and lag, the worst lag;
* an ``AssetObservation`` of the consumer's sink with the same worst lag as ``reactive.lag_seconds``,
  so that the sink's plot shows the lag as it was between (and during) runs.

The rate limit reads the newest observation of the stream asset from the instance (one indexed query
per tick): it holds across daemon restarts and code-server processes, with no state of its own.
Measuring reads one record per shard after its checkpoint, once a minute: DynamoDB Streams allows
five reads a second per shard, shared by at most two readers.
"""

# No `from __future__ import annotations`: Dagster reads the wrapped sensor's parameter annotations.

import time
from collections.abc import Callable, Sequence

from dagster import AssetKey, AssetObservation, MetadataValue, SensorEvaluationContext, SensorResult

from durability_pipelines.checkpoints.errors import DurabilityError
from durability_pipelines.consumer.config import ConsumerConfig
from durability_pipelines.consumer.dispatch import shard_id
from durability_pipelines.consumer.lag import ShardLag, measure_lag
from durability_pipelines.observability import LAG_BYTES, LAG_SECONDS, RETAINED_WAL_BYTES
from durability_pipelines.orchestration.resources import DurabilityResource

#: A consumer observes its stream at most this often (seconds).
OBSERVE_EVERY_S = 60.0
#: How many recent observations of a stream are searched for this consumer's newest one.
_RECENT = 20

SensorFn = Callable[[SensorEvaluationContext, DurabilityResource], SensorResult]


def last_observed_at(context: SensorEvaluationContext, cfg: ConsumerConfig, stream_key: AssetKey) -> float | None:
    """When this consumer last observed its stream (epoch seconds), from the instance's event log."""
    records = context.instance.fetch_observations(stream_key, limit=_RECENT).records
    for record in records:  # newest first
        observation = record.asset_observation
        consumer = observation.metadata.get("consumer") if observation is not None else None
        if consumer is not None and getattr(consumer, "value", consumer) == cfg.name:
            return record.timestamp
    return None


def measure_consumer_lag(durability: DurabilityResource, cfg: ConsumerConfig) -> list[ShardLag]:
    """``consumer/lag.measure_lag`` on a runtime of its own (opened and closed here): the sensor's
    observation and the lag check measure alike."""
    return measure_consumer_lag_and_refusals(durability, cfg)[0]


def measure_consumer_lag_and_refusals(durability: DurabilityResource, cfg: ConsumerConfig
                                      ) -> tuple[list[ShardLag], dict[str, str]]:
    """The lag, and the parts of the checkpoint store that refused the credentials or the database while it
    was measured (a hybrid store measures on its other part: ``CheckpointStore.refusals``)."""
    rt = durability.runtime(cfg)
    try:
        return measure_lag(rt), rt.store.refusals()
    finally:
        rt.close()


#: (Dagster instance, consumer) -> when this process last tried to observe the stream. A tick that times out
#: records no observation: without this, every following tick would measure again (a read per shard) and
#: time out too.
_ATTEMPTED: dict[tuple[str, str], float] = {}


def _attempt_key(context: SensorEvaluationContext, cfg: ConsumerConfig) -> tuple[str, str]:
    """The instance (its storage, as the code server knows it; an in-process instance by identity) and consumer."""
    ref = getattr(context, "instance_ref", None)
    return (repr(ref) if ref is not None else f"instance-{id(context.instance)}", cfg.name)


def observation_due(context: SensorEvaluationContext, cfg: ConsumerConfig, stream_key: AssetKey, *,
                    now: float | None = None, every_s: float = OBSERVE_EVERY_S) -> bool:
    now = time.time() if now is None else now
    if now - _ATTEMPTED.get(_attempt_key(context, cfg), float("-inf")) < every_s:
        return False
    last = last_observed_at(context, cfg, stream_key)
    return last is None or now - last >= every_s


def _blank(value: object) -> object:
    return "" if value is None else value


def _per_shard_table(lags: Sequence[ShardLag]) -> str:
    rows = [f"| {shard_id(x.shard)} | {x.acked or ''} | {_blank(x.lag_s)} | {_blank(x.lag_bytes)} | "
            f"{_blank(x.retained_bytes)} | {x.oldest_waiting or ''} | {x.problem or ''} |" for x in lags[:50]]
    return "\n".join(["| shard | acked | lag (s) | lag (bytes) | retained (bytes) | oldest waiting | problem |",
                      "|---|---|---|---|---|---|---|", *rows])


def _byte_figures(lags: Sequence[ShardLag]) -> dict[str, int]:
    """The worst lag and retained WAL in bytes, for sources that tell them (``ReportsBacklogBytes``)."""
    out = {}
    for metric, values in ((LAG_BYTES, [x.lag_bytes for x in lags]), (RETAINED_WAL_BYTES, [x.retained_bytes for x in lags])):
        known = [v for v in values if v is not None]
        if known:
            out[metric] = max(known)
    return out


def stream_events(cfg: ConsumerConfig, lags: Sequence[ShardLag], stream_key: AssetKey, sink_key: AssetKey
                  ) -> list[AssetObservation]:
    """The observations of one measurement: the stream asset's, and the sink's lag."""
    known = [x.lag_s for x in lags if x.lag_s is not None]
    worst = max(known, default=0.0)
    figures = {
        "consumer": cfg.name,
        "shards": len(lags),
        "shards_waiting": sum(1 for x in known if x > 0),
        "shards_unknown": len(lags) - len(known),
        LAG_SECONDS: worst,
        **_byte_figures(lags),
    }
    stream = AssetObservation(
        asset_key=stream_key, description=f"seen by consumer {cfg.name}: {len(lags)} shard(s), "
        f"worst lag {worst:.1f} s",
        metadata={**figures, "acked": MetadataValue.json({shard_id(x.shard): x.acked for x in lags}),
                  "per_shard": MetadataValue.md(_per_shard_table(lags))})
    sink = AssetObservation(asset_key=sink_key, metadata=figures,
                            description=f"lag measured by {cfg.name}_sensor between batches")
    return [stream, sink]


def observe_stream(cfg: ConsumerConfig, stream_key: AssetKey, sink_key: AssetKey, *,
                   every_s: float = OBSERVE_EVERY_S) -> Callable[[SensorFn], SensorFn]:
    """Decorate a consumer sensor's evaluation function (beneath ``@sensor``): when an observation is due,
    the tick's result also carries :func:`stream_events`. A failed measurement is logged, never fails the
    tick (the consumer's work comes first)."""

    def decorate(evaluate: SensorFn) -> SensorFn:
        def observed(context: SensorEvaluationContext, durability: DurabilityResource) -> SensorResult:
            result = evaluate(context, durability)
            if not isinstance(result, SensorResult) or not observation_due(context, cfg, stream_key, every_s=every_s):
                return result
            _ATTEMPTED[_attempt_key(context, cfg)] = time.time()
            try:
                lags = measure_consumer_lag(durability, cfg)
            except DurabilityError as exc:
                context.log.warning(f"stream {cfg.stream} not observed: {type(exc).__name__}: {exc}")
                return result
            return SensorResult(run_requests=result.run_requests, skip_reason=result.skip_reason,
                                cursor=result.cursor, dynamic_partitions_requests=result.dynamic_partitions_requests,
                                asset_events=[*result.asset_events, *stream_events(cfg, lags, stream_key, sink_key)])

        observed.__name__ = getattr(evaluate, "__name__", "observed")
        observed.__doc__ = evaluate.__doc__
        return observed

    return decorate
