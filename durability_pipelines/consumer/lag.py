"""How far behind a consumer is, per shard, measured from the outside (the lag objective's check).

The lag of a shard is the age of its oldest record not yet acked: 0 when nothing is waiting, however
old the newest acked record is (a quiet stream is not a late consumer). It is measured by reading one
record after the acked checkpoint, which has no side effect: no lease, no save, no dead letter.

A source whose server keeps a log for the consumer (a replication slot: ``ReportsBacklogBytes``) is also
measured in bytes: the WAL after the checkpoint and the WAL the slot retains. Seconds say how late the
consumer is; bytes say what that costs the server (its disk) and how close the slot is to
``max_slot_wal_keep_size``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timezone

from durability_pipelines.checkpoints.errors import DurabilityError
from durability_pipelines.consumer.dispatch import shard_id
from durability_pipelines.consumer.runtime import ConsumerRuntime
from durability_pipelines.consumer.source import ReportsBacklogBytes, ReportsHoldup, StreamSource


@dataclass(frozen=True)
class ShardLag:
    shard: str | None
    acked: str | None
    #: age of the oldest record waiting, in seconds; 0.0 = nothing waiting; None = unknown (see problem)
    lag_s: float | None
    oldest_waiting: str | None = None
    last_ack_at: datetime | None = None
    problem: str | None = None
    #: why the waiting records cannot be read yet (``ReportsHoldup``), e.g. an open transaction
    held_back: str | None = None
    #: ``ReportsBacklogBytes`` sources: log bytes after the checkpoint / kept by the server (None: not told)
    lag_bytes: int | None = None
    retained_bytes: int | None = None

    def describe(self) -> str:
        last = self.last_ack_at.isoformat(timespec="seconds") if self.last_ack_at else "never"
        size = "".join(f", {what} {_size(n)}" for what, n in (("WAL behind", self.lag_bytes),
                                                               ("retained", self.retained_bytes)) if n is not None)
        if self.problem:
            return f"shard {shard_id(self.shard)}: lag unknown ({self.problem}){size}; last ack {last}"
        held = f", {self.held_back}" if self.held_back else ""
        return (f"shard {shard_id(self.shard)}: lag {self.lag_s:.1f} s (oldest waiting record "
                f"{self.oldest_waiting or '-'}{held}){size}, acked {self.acked or '(nothing yet)'}, last ack {last}")


def _size(n: int) -> str:
    """Bytes for a person: the unit that keeps the number short (binary units, like Postgres's pg_size_pretty)."""
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _age_s(created: datetime | None, now: datetime) -> float | None:
    if created is None:
        return None
    if created.tzinfo is None:
        created = created.replace(tzinfo=timezone.utc)
    return round(max(0.0, (now - created).total_seconds()), 3)


def measure_lag(rt: ConsumerRuntime, *, now: datetime | None = None) -> list[ShardLag]:
    """Every readable shard's lag. A shard whose checkpoint or stream cannot be read is reported with
    its problem (and lag unknown), never skipped, and never stops the measurement of the others."""
    now = now or datetime.now(timezone.utc)
    shards = rt.source.list_shards()
    acked: dict[str | None, str | None] = {}
    out: list[ShardLag] = []
    for shard in shards:
        try:
            acked[shard] = rt.store.load(rt.key(shard))
        except DurabilityError as exc:
            out.append(ShardLag(shard, None, None, problem=f"checkpoint unreadable: {exc}"))
    unreadable = {lag.shard for lag in out}
    for shard in (s for s in rt.source.readable(acked) if s not in unreadable):
        out.append(_with_bytes(rt.source, _shard_lag(rt, shard, acked.get(shard), now)))
    return out


def _shard_lag(rt: ConsumerRuntime, shard: str | None, after: str | None, now: datetime) -> ShardLag:
    last = _last_ack_at(rt, shard)
    try:
        batch = rt.source.read(shard, after, 1)
    except DurabilityError as exc:
        return ShardLag(shard, after, None, last_ack_at=last, problem=f"{type(exc).__name__}: {exc}")
    if not batch.events:
        return _nothing_readable(rt, shard, after, last, now)
    first = batch.events[0]
    age = _age_s(first.created_at, now)
    return ShardLag(shard, after, age, first.sequence, last,
                    problem=None if age is not None else "the source gives no record times")


def _with_bytes(source: StreamSource, lag: ShardLag) -> ShardLag:
    """The lag in bytes too, for a ``ReportsBacklogBytes`` source (a failed measurement leaves it unknown:
    the lag in seconds, or its problem, already says what is wrong)."""
    if not isinstance(source, ReportsBacklogBytes):  # a capability (Protocol), not a concrete class
        return lag
    try:
        backlog = source.backlog_bytes(lag.shard, lag.acked)
    except DurabilityError:
        return lag
    if backlog is None:
        return lag
    return replace(lag, lag_bytes=backlog.lag_bytes, retained_bytes=backlog.retained_bytes)


def _nothing_readable(rt: ConsumerRuntime, shard: str | None, after: str | None, last: datetime | None,
                      now: datetime) -> ShardLag:
    """0 when nothing waits; when records wait behind something (``ReportsHoldup``), their age and what."""
    holdup = None
    if isinstance(rt.source, ReportsHoldup):  # a capability (Protocol), not a concrete class
        try:
            holdup = rt.source.held_back(shard, after)
        except DurabilityError as exc:
            return ShardLag(shard, after, None, last_ack_at=last, problem=f"{type(exc).__name__}: {exc}")
    if holdup is None:
        return ShardLag(shard, after, 0.0, last_ack_at=last)
    return ShardLag(shard, after, _age_s(holdup.oldest_at, now), holdup.oldest_sequence, last, held_back=holdup.reason)


def explain_caught_up(source: StreamSource | None, skipped: Mapping[str, str],
                      acked: Mapping[str | None, str | None]) -> dict[str, str]:
    """For the sensor's skip reasons: a shard skipped as "caught up" whose records wait behind a holdup
    (``ReportsHoldup``: an open transaction holding the change feed back) says so instead."""
    if not isinstance(source, ReportsHoldup):  # a capability (Protocol), not a concrete class
        return {}
    out: dict[str, str] = {}
    for shard, after in acked.items():
        sid = shard_id(shard)
        if skipped.get(sid) != "caught up":
            continue
        try:
            holdup = source.held_back(shard, after)
        except DurabilityError:
            continue  # the peek said nothing is readable; the run or the next tick names the problem
        if holdup is not None:
            out[sid] = f"nothing readable: {holdup.reason}"
    return out


def _last_ack_at(rt: ConsumerRuntime, shard: str | None) -> datetime | None:
    try:
        entries = rt.store.history(rt.key(shard), limit=1)
    except (DurabilityError, NotImplementedError):
        return None
    return entries[0].ts if entries else None
