"""Metric names, a JSONL sink and helpers that turn figures into Dagster metadata.

One vocabulary for sensors, ops and assets so dashboards and audits agree:
``reactive.ack.success_rate``, ``reactive.sequence_gap``,
``reactive.events_per_batch``, ``reactive.events_filtered``, ``adapter.call.duration_ms``,
``reactive.lag_seconds`` and ``reactive.records_behind``, each labelled adapter / stream / group / consumer /
shard.  JSONL output is enabled by ``DURABILITY_OBSERVABILITY_JSONL=<path>``
(``AINL_OBSERVABILITY_JSONL``, the original pattern's variable, also works).
No Dagster import: the Dagster layer converts ``summary()`` into metadata.
"""

from __future__ import annotations

import json
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

ACK_SUCCESS_RATE = "reactive.ack.success_rate"
SEQUENCE_GAP = "reactive.sequence_gap"
EVENTS_PER_BATCH = "reactive.events_per_batch"
EVENTS_FILTERED = "reactive.events_filtered"  # events kept from the handler by the filter (yet acked)
CALL_DURATION_MS = "adapter.call.duration_ms"
LAG_SECONDS = "reactive.lag_seconds"
RECORDS_BEHIND = "reactive.records_behind"
METRICS = (ACK_SUCCESS_RATE, SEQUENCE_GAP, EVENTS_PER_BATCH, EVENTS_FILTERED, CALL_DURATION_MS, LAG_SECONDS,
           RECORDS_BEHIND)

JSONL_ENV = "DURABILITY_OBSERVABILITY_JSONL"
LEGACY_JSONL_ENV = "AINL_OBSERVABILITY_JSONL"


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

    def __init__(self, labels: Labels, *, jsonl_path: str | None = None, use_env: bool = True) -> None:
        self.labels = labels
        self.jsonl_path = jsonl_path or (jsonl_path_from_env() if use_env else None)
        self.values: dict[tuple[str, Labels, str], list[float]] = defaultdict(list)

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


def read_jsonl(path: str | Path) -> list[Mapping[str, object]]:
    """Parse a metrics file (for tests, audits and the demo summary)."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
