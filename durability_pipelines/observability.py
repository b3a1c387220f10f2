"""Metric names, a JSONL sink and helpers that turn figures into Dagster metadata.

One vocabulary for sensors, ops and assets so dashboards and audits agree:
``reactive.ack.success_rate``, ``reactive.sequence_gap``,
``reactive.events_per_batch``, ``reactive.events_filtered``, ``adapter.call.duration_ms``,
``reactive.lag_seconds`` and ``reactive.records_behind``, each labelled adapter / stream / group / consumer /
shard; sources whose server keeps a log for the consumer (a replication slot: ``ReportsBacklogBytes``) add
``reactive.lag_bytes``, ``reactive.slot_lag_bytes`` and ``reactive.retained_wal_bytes``.  JSONL output is enabled by ``DURABILITY_OBSERVABILITY_JSONL=<path>``
(``AINL_OBSERVABILITY_JSONL``, the original pattern's variable, also works).
No Dagster import: the Dagster layer converts ``summary()`` into metadata.

With ``DURABILITY_PUSHGATEWAY_URL`` set, the same figures also become Prometheus counters, gauges and
histograms (``prometheus_client``), pushed to that Pushgateway by a run: every
``DURABILITY_PUSHGATEWAY_INTERVAL_S`` while it drains and once when it ends (``PushgatewayExporter``;
the names are in ``PROMETHEUS_NAMES``). A run process is short-lived, so it pushes rather than wait
to be scraped.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)

ACK_SUCCESS_RATE = "reactive.ack.success_rate"
SEQUENCE_GAP = "reactive.sequence_gap"
EVENTS_PER_BATCH = "reactive.events_per_batch"
EVENTS_FILTERED = "reactive.events_filtered"  # events kept from the handler by the filter (yet acked)
CALL_DURATION_MS = "adapter.call.duration_ms"
LAG_SECONDS = "reactive.lag_seconds"
RECORDS_BEHIND = "reactive.records_behind"
#: WAL bytes after the acked checkpoint, after the slot's confirmed position, and kept by the slot (the disk
#: it costs): the backlog of a source measured in bytes (``consumer.source.ReportsBacklogBytes``).
LAG_BYTES = "reactive.lag_bytes"
SLOT_LAG_BYTES = "reactive.slot_lag_bytes"
RETAINED_WAL_BYTES = "reactive.retained_wal_bytes"
#: Prometheus only (a counter; not in the JSONL file nor the summary): events of a batch the handler failed.
EVENTS_FAILED = "reactive.events_failed"
METRICS = (ACK_SUCCESS_RATE, SEQUENCE_GAP, EVENTS_PER_BATCH, EVENTS_FILTERED, CALL_DURATION_MS, LAG_SECONDS,
           RECORDS_BEHIND, LAG_BYTES, SLOT_LAG_BYTES, RETAINED_WAL_BYTES)

JSONL_ENV = "DURABILITY_OBSERVABILITY_JSONL"
LEGACY_JSONL_ENV = "AINL_OBSERVABILITY_JSONL"
PUSHGATEWAY_ENV = "DURABILITY_PUSHGATEWAY_URL"
PUSH_INTERVAL_ENV = "DURABILITY_PUSHGATEWAY_INTERVAL_S"
PUSH_JOB_ENV = "DURABILITY_PUSHGATEWAY_JOB"
PUSH_INSTANCE_ENV = "DURABILITY_PUSHGATEWAY_INSTANCE"
DEFAULT_PUSH_INTERVAL_S = 15.0
DEFAULT_PUSH_JOB = "durability_pipelines"


@dataclass(frozen=True)
class Labels:
    adapter: str
    stream: str
    group: str = ""
    consumer: str = ""
    shard: str = ""
    operation: str = ""  # only on adapter.call.duration_ms: e.g. GetRecords, redis.save

    def with_(self, **changes: str) -> Labels:
        return Labels(**{**asdict(self), **changes})

    def as_dict(self) -> dict[str, str]:
        d = asdict(self)
        if not d["operation"]:
            del d["operation"]
        return d


def jsonl_path_from_env() -> str | None:
    return os.environ.get(JSONL_ENV) or os.environ.get(LEGACY_JSONL_ENV) or None


class Metrics:
    """Collects figures for one unit of work (a tick, a batch, a materialization).

    Every ``record`` goes to the JSONL file (if configured) immediately and is
    kept in memory so the caller can attach a summary as Dagster metadata.
    """

    _file_lock = threading.Lock()

    def __init__(self, labels: Labels, *, jsonl_path: str | None = None, use_env: bool = True,
                 exporter: PushgatewayExporter | None = None) -> None:
        self.labels = labels
        self.jsonl_path = jsonl_path or (jsonl_path_from_env() if use_env else None)
        self.values: dict[tuple[str, Labels, str], list[float]] = defaultdict(list)
        #: the Prometheus side (None unless a Pushgateway is configured): fed by every ``record``, pushed
        #: only once ``start_pushing`` was called (a run that reads its shard; never a sensor tick)
        self.exporter = exporter if exporter is not None else (PushgatewayExporter.from_env() if use_env else None)

    def record(self, metric: str, value: float, *, kind: str = "gauge", labels: Labels | None = None,
               **extra_labels: str) -> None:
        lbl = labels or self.labels
        if extra_labels:
            lbl = lbl.with_(**extra_labels)
        if kind == "timer":
            value = round(float(value), 3)
        self.values[(metric, lbl, kind)].append(float(value))
        if self.jsonl_path:
            line = json.dumps(
                {"kind": kind, "metric": metric, "value": value, "labels": lbl.as_dict(),
                 "ts": datetime.now(timezone.utc).isoformat()},
                separators=(",", ":"),
            )
            path = Path(self.jsonl_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            # One write() of a short line with O_APPEND: atomic across processes.
            with self._file_lock, open(path, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")
        if self.exporter is not None:
            self.exporter.observe(metric, value, kind, lbl)

    def count(self, metric: str, amount: float, *, labels: Labels | None = None) -> None:
        """A Prometheus-only counter increment (``EVENTS_FAILED``); nothing without a Pushgateway."""
        if self.exporter is not None:
            self.exporter.count(metric, amount, labels or self.labels)

    def start_pushing(self, shard: str | None) -> None:
        """This is a run draining ``shard``: push to the Pushgateway periodically and at ``close`` (grouped
        by consumer and shard). Idempotent; a no-op without a Pushgateway."""
        if self.exporter is not None:
            self.exporter.start(self.labels.with_(shard=shard or ""))

    def close(self) -> None:
        """The unit of work ended: a run's last push (a no-op when nothing was pushing)."""
        if self.exporter is not None:
            self.exporter.close()

    @contextmanager
    def timed(self, operation: str, adapter: str | None = None, shard: str | None = None) -> Iterator[None]:
        """Record ``adapter.call.duration_ms`` for one call to AWS / Redis / Postgres / the handler."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.call_duration(operation, (time.perf_counter() - start) * 1000, adapter, shard)

    def call_duration(self, operation: str, duration_ms: float, adapter: str | None = None,
                      shard: str | None = None) -> None:
        changes = {"operation": operation}
        if adapter:
            changes["adapter"] = adapter
        if shard:
            changes["shard"] = shard
        self.record(CALL_DURATION_MS, round(duration_ms, 3), kind="timer", labels=self.labels.with_(**changes))

    def summary(self) -> dict[str, float]:
        """Flat ``{name: number}``: last value of each gauge; count/p50/max of each timer."""
        out: dict[str, float] = {}
        for (metric, labels, kind), vals in sorted(self.values.items(), key=lambda kv: kv[0][0]):
            suffix = f"[{labels.shard}]" if labels.shard and labels.shard != self.labels.shard else ""
            if labels.operation:
                suffix += f"[{labels.operation}]"
            if kind == "timer":
                out[f"{metric}{suffix}.count"] = len(vals)
                out[f"{metric}{suffix}.p50"] = round(statistics.median(vals), 3)
                out[f"{metric}{suffix}.max"] = round(max(vals), 3)
            else:
                out[f"{metric}{suffix}"] = vals[-1]
        return out


# -- Prometheus ------------------------------------------------------------------------------------

LABEL_NAMES = ("adapter", "stream", "group", "consumer", "shard")
#: Seed name -> the Prometheus series it feeds (dots become underscores, the unit is in the name).
PROMETHEUS_NAMES: dict[str, tuple[str, ...]] = {
    EVENTS_PER_BATCH: ("reactive_events_per_batch (histogram)", "reactive_events_total (counter)",
                       "reactive_acks_total (counter)", "reactive_last_ack_timestamp_seconds (gauge)"),
    EVENTS_FILTERED: ("reactive_events_filtered_total (counter)",),
    EVENTS_FAILED: ("reactive_events_failed_total (counter)",),
    ACK_SUCCESS_RATE: ("reactive_ack_success_rate (gauge)",),
    SEQUENCE_GAP: ("reactive_sequence_gap (gauge)",),
    LAG_SECONDS: ("reactive_lag_seconds (gauge)",),
    RECORDS_BEHIND: ("reactive_records_behind (gauge)",),
    LAG_BYTES: ("reactive_lag_bytes (gauge)",),
    SLOT_LAG_BYTES: ("reactive_slot_lag_bytes (gauge)",),
    RETAINED_WAL_BYTES: ("reactive_retained_wal_bytes (gauge)",),
    CALL_DURATION_MS: ("adapter_call_duration_seconds (histogram, + operation label; milliseconds / 1000)",),
}
CALL_DURATION_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
EVENTS_PER_BATCH_BUCKETS = (0, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


def push_instance(labels: Labels, prefix: str = "") -> str:
    """The Pushgateway grouping key's ``instance``: ``<adapter>:<stream>:<group>:<consumer>[:<shard>]`` (the
    checkpoint key's parts), so runs of different consumers and shards never replace each other's metrics;
    ``DURABILITY_PUSHGATEWAY_INSTANCE`` (e.g. a deployment's name) is put in front, ``<prefix>/...``."""
    parts = [labels.adapter, labels.stream, labels.group, labels.consumer] + ([labels.shard] if labels.shard else [])
    key = ":".join(parts)
    return f"{prefix}/{key}" if prefix else key


class PushgatewayExporter:
    """The figures of one ``Metrics`` as Prometheus metrics in a registry of their own, pushed (HTTP PUT: the
    group's metrics are replaced as a whole) to a Pushgateway under the grouping key
    ``{job=<DURABILITY_PUSHGATEWAY_JOB>, instance=push_instance(...)}``.

    Counters count from the run's start (a new run of the shard starts them again at 0, which ``rate()`` and
    ``increase()`` read as a counter reset). A failed push is logged and never fails the run.
    """

    def __init__(self, url: str, *, job: str = DEFAULT_PUSH_JOB, instance_prefix: str = "",
                 interval_s: float = DEFAULT_PUSH_INTERVAL_S, timeout_s: float = 5.0) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.url = url
        self.job = job
        self.instance_prefix = instance_prefix
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.registry = CollectorRegistry()
        r, names = self.registry, LABEL_NAMES
        self._events_per_batch = Histogram("reactive_events_per_batch", "Events per acked batch", names,
                                           buckets=EVENTS_PER_BATCH_BUCKETS, registry=r)
        self._events = Counter("reactive_events", "Events read and acked", names, registry=r)
        self._acks = Counter("reactive_acks", "Batches acked", names, registry=r)
        self._filtered = Counter("reactive_events_filtered", "Events the filter kept from the handler (acked)",
                                 names, registry=r)
        self._failed = Counter("reactive_events_failed", "Events the handler reported failed", names, registry=r)
        self._last_ack = Gauge("reactive_last_ack_timestamp_seconds", "Unix time of the last batch ack", names,
                               registry=r)
        self._gauges = {
            ACK_SUCCESS_RATE: Gauge("reactive_ack_success_rate", "(events - failed) / events of the last batch",
                                    names, registry=r),
            SEQUENCE_GAP: Gauge("reactive_sequence_gap", "Checkpoint to newest sequence of the last batch", names,
                                registry=r),
            LAG_SECONDS: Gauge("reactive_lag_seconds", "Age of the newest record acked (IteratorAge)", names,
                               registry=r),
            RECORDS_BEHIND: Gauge("reactive_records_behind", "Records still in the stream after the last batch",
                                  names, registry=r),
            LAG_BYTES: Gauge("reactive_lag_bytes", "WAL bytes written after the acked checkpoint", names, registry=r),
            SLOT_LAG_BYTES: Gauge("reactive_slot_lag_bytes", "WAL bytes written after the replication slot's "
                                  "confirmed_flush_lsn", names, registry=r),
            RETAINED_WAL_BYTES: Gauge("reactive_retained_wal_bytes", "WAL bytes the replication slot keeps the "
                                      "server from recycling (from restart_lsn)", names, registry=r),
        }
        self._durations = Histogram("adapter_call_duration_seconds", "Duration of a call (AWS, change log, store, "
                                    "handler, mirror)", (*names, "operation"), buckets=CALL_DURATION_BUCKETS_S,
                                    registry=r)
        self.grouping_key: dict[str, str] | None = None
        self.pushes = 0
        self.last_error: str | None = None
        self._push_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> PushgatewayExporter | None:
        env = os.environ if env is None else env
        url = (env.get(PUSHGATEWAY_ENV) or "").strip()
        if not url:
            return None
        try:
            interval = float(env.get(PUSH_INTERVAL_ENV) or DEFAULT_PUSH_INTERVAL_S)
        except ValueError:
            log.warning("%s=%r is not a number; pushing every %s s", PUSH_INTERVAL_ENV, env.get(PUSH_INTERVAL_ENV),
                        DEFAULT_PUSH_INTERVAL_S)
            interval = DEFAULT_PUSH_INTERVAL_S
        return cls(url, job=env.get(PUSH_JOB_ENV) or DEFAULT_PUSH_JOB,
                   instance_prefix=env.get(PUSH_INSTANCE_ENV) or "", interval_s=max(interval, 1.0))

    @staticmethod
    def _values(labels: Labels) -> tuple[str, ...]:
        return (labels.adapter, labels.stream, labels.group, labels.consumer, labels.shard)

    def observe(self, metric: str, value: float, kind: str, labels: Labels) -> None:
        if kind == "timer" or metric == CALL_DURATION_MS:
            self._durations.labels(*self._values(labels), labels.operation).observe(float(value) / 1000.0)
            return
        values = self._values(labels)
        if metric == EVENTS_PER_BATCH:
            self._events_per_batch.labels(*values).observe(value)
            self._events.labels(*values).inc(max(float(value), 0.0))
            self._acks.labels(*values).inc()
            self._last_ack.labels(*values).set(time.time())
        elif metric == EVENTS_FILTERED:
            self._filtered.labels(*values).inc(max(float(value), 0.0))
        elif metric in self._gauges:
            self._gauges[metric].labels(*values).set(float(value))

    def count(self, metric: str, amount: float, labels: Labels) -> None:
        if metric == EVENTS_FAILED:
            self._failed.labels(*self._values(labels)).inc(max(float(amount), 0.0))

    def start(self, group: Labels) -> None:
        """Push under ``group``'s grouping key every ``interval_s`` from a daemon thread (not from the batch
        loop: a slow Pushgateway never slows a batch), until ``close``."""
        if self._thread is not None:
            return
        self.grouping_key = {"instance": push_instance(group, self.instance_prefix)}
        self._thread = threading.Thread(target=self._loop, name="pushgateway", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.push()

    def push(self) -> bool:
        if self.grouping_key is None:
            return False
        from prometheus_client import push_to_gateway

        with self._push_lock:
            try:
                push_to_gateway(self.url, job=self.job, registry=self.registry, grouping_key=self.grouping_key,
                                timeout=self.timeout_s)
            except Exception as exc:  # monitoring must never fail a run
                error = f"{type(exc).__name__}: {exc}"
                if error != self.last_error:
                    log.warning("could not push metrics to the Pushgateway %s (%s); the run goes on", self.url,
                                error)
                self.last_error = error
                return False
            self.pushes += 1
            self.last_error = None
            return True

    def close(self) -> None:
        """Stop the periodic pushes and push the final figures (once)."""
        if self._thread is None or self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(self.timeout_s + 1)
        self.push()


def read_jsonl(path: str | Path) -> list[Mapping[str, object]]:
    """Parse a metrics file (for tests, audits and the demo summary)."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
