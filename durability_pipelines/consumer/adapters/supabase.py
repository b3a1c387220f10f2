"""``StreamSource`` over the Supabase change feed (``sources.supabase_changes``).

The feed is unsharded: one pseudo-shard ``None``, so the checkpoint key is
``checkpoint:supabase:<channel>:<group>:<consumer>``. A checkpoint is a change-feed position
(``txid * 10**19 + id``, see ``sources/supabase_changes.py`` for why not the bare id).

``replay_from`` decides only where a consumer WITHOUT a checkpoint starts; with one, every mode
resumes from it (moving a checkpoint is an operator's act: ``durability-pipelines checkpoints``):

* ``stored`` (default): nowhere. The read fails with ``NoCheckpointError`` naming the fixes, so a
  lost checkpoint (a flushed Redis, a renamed group) never silently replays or skips the log.
* ``earliest``: the oldest change still in the log (retention may have purged older ones).
* ``latest``: after every change settled now. The first run delivers nothing and checkpoints that
  position, so "now" is pinned once rather than re-evaluated by every run.

A stored sentinel is honoured too: ``TRIM_HORIZON`` = earliest, ``LATEST`` = pin latest,
``SHARD_END`` = nothing more to read.

Unread rows removed from the log by anything but the purge (the removal triggers record it) are
trimmed data: ``trim_policy: fail`` raises ``ChangeLogGapError`` naming the range;
``skip_to_trim_horizon`` returns the batch with a ``Gap`` (audited in ``stream_gaps``) and goes on
past the range, delivering the rows still in the log.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from durability_pipelines.checkpoints.errors import ConfigError
from durability_pipelines.checkpoints.ordering import LATEST, SHARD_END, TRIM_HORIZON, normalize_sequence
from durability_pipelines.consumer.config import ConsumerConfig, SupabaseSourceConfig, SupabaseWalSourceConfig
from durability_pipelines.consumer.events import ChangeEvent
from durability_pipelines.consumer.source import CallHook, Gap, Holdup, SourceBatch
from durability_pipelines.sources.supabase_changes import (
    ADAPTER,
    ChangeFeedError,
    ChangeFeedReader,
    ChangeLogGapError,
    ChangeRow,
    FeedBatch,
    QualifiedName,
    install_change_feed,
)

log = logging.getLogger(__name__)

FALLBACK_DB_URL_ENV = "DURABILITY_POSTGRES_URL"


_INSTALLED: set[tuple[str, str, str]] = set()
#: A full batch counts the rows still behind it up to this many (a count of millions would cost more than the batch).
BEHIND_COUNT_LIMIT = 100_000


class NoCheckpointError(ChangeFeedError):
    """``replay_from: stored`` and the consumer has no checkpoint to resume from."""


def resolve_db_url(cfg: SupabaseSourceConfig, postgres_url: str | None = None) -> str:
    """The change log's database: ``$<db_url_env>``, else ``postgres_url`` (the project's Postgres, which
    the caller resolved: the runtime passes the one its stores use), else ``$DURABILITY_POSTGRES_URL``."""
    url = os.environ.get(cfg.db_url_env) or postgres_url or os.environ.get(FALLBACK_DB_URL_ENV)
    if url:
        return url
    raise ConfigError(
        f"supabase source for channel {cfg.channel!r}: no database URL. Set {cfg.db_url_env} to the Supabase "
        f"project's Postgres URL (Settings > Database) or {FALLBACK_DB_URL_ENV}, or pass postgres_url to "
        "build_source (the Dagster resource passes the project's Postgres)"
    )


def to_event(channel: str, row: ChangeRow) -> ChangeEvent:
    return ChangeEvent(
        adapter=ADAPTER, stream=channel, shard=None, sequence=row.sequence, event_name=row.operation,
        keys=row.keys, new_image=row.record, old_image=row.old_record, created_at=row.captured_at,
        event_id=str(row.id),
    )


class UnshardedFeed:
    """What the Postgres change feeds (trigger log, WAL) share: one unsharded stream, and where a read
    starts from a stored position (or, without one, from ``replay_from``)."""

    cfg: SupabaseSourceConfig | SupabaseWalSourceConfig
    stream: str

    def list_shards(self) -> list[str | None]:
        return [None]

    def readable(self, acked: Mapping[str | None, str | None]) -> list[str | None]:
        return [None]

    def _start(self, after: str | None) -> tuple[str, int | None]:
        """('read', position or None = from the beginning) | ('pin', None) | ('end', None) | ('none', None)."""
        if after is None:
            return {"stored": ("none", None), "earliest": ("read", None), "latest": ("pin", None)}[self.cfg.replay_from]
        after = normalize_sequence(after, key=f"checkpoint:supabase:{self.stream}")
        if after == TRIM_HORIZON:
            return ("read", None)
        if after == LATEST:
            return ("pin", None)
        if after == SHARD_END:
            return ("end", None)
        return ("read", int(after))


class SupabaseChangeFeedSource(UnshardedFeed):
    """One channel = one source table's changes in one change log."""

    adapter = ADAPTER
    #: one change log is one stream for as long as it exists: nothing to tell streams apart by
    identity: str | None = None

    def __init__(self, cfg: SupabaseSourceConfig, *, db_url: str, on_call: CallHook | None = None,
                 reader: ChangeFeedReader | None = None) -> None:
        self.cfg = cfg
        self.stream = cfg.channel
        self.table = QualifiedName.parse(cfg.table)
        if cfg.install and reader is None and (db_url, str(self.table), cfg.change_log) not in _INSTALLED:
            # Once per process: a sensor builds the source every tick and must not run DDL each time.
            import psycopg

            with psycopg.connect(db_url, autocommit=True) as conn:
                install_change_feed(conn, str(self.table), change_log=cfg.change_log)
            _INSTALLED.add((db_url, str(self.table), cfg.change_log))
        self.reader = reader or ChangeFeedReader(
            db_url, change_log=cfg.change_log, table=str(self.table), on_call=on_call,
        )

    def has_new(self, shard: str | None, after: str | None) -> bool:
        mode, position = self._start(after)
        if mode in ("pin", "none"):
            return True  # a run must pin the position / explain the missing checkpoint
        if mode == "end":
            return False
        return self.reader.has_new(position)

    def held_back(self, shard: str | None, after: str | None) -> Holdup | None:
        """``ReportsHoldup``: the open transaction that keeps waiting changes from being read, if any."""
        mode, position = self._start(after)
        if mode != "read":
            return None
        holdup = self.reader.held_back(position)
        if holdup is None:
            return None
        return Holdup(holdup.describe(), str(holdup.oldest_position), holdup.oldest_captured_at)

    def read(self, shard: str | None, after: str | None, max_events: int) -> SourceBatch:
        mode, position = self._start(after)
        if mode == "none":
            raise NoCheckpointError(
                f"consumer of channel {self.stream!r} has no checkpoint and replay_from is 'stored', so it does not "
                "guess where to start. Nothing was read. Either set replay_from: earliest (process every change "
                "still in the log) or replay_from: latest (start from now) in the consumer's YAML, or seed a "
                "checkpoint with `durability-pipelines checkpoints set ... --sequence <position>`. If this consumer "
                "HAD a checkpoint, find out why it is gone (flushed Redis? renamed group/consumer?) first."
            )
        if mode == "end":
            return SourceBatch(shard, after, [], None, shard_ended=True)
        if mode == "pin":
            return SourceBatch(shard, after, [], str(self.reader.latest_position()))
        got = self.reader.read_batch(position, max_events)
        rows = got.rows
        events = [to_event(self.stream, r) for r in rows]
        last = events[-1].sequence if events else None
        behind = 0 if len(rows) < max_events else self.reader.pending_count(int(last), limit=BEHIND_COUNT_LIMIT)
        if got.removed is None:
            return SourceBatch(shard, after, events, last, behind=behind)
        return self._removed(shard, after, got, events, behind)

    def _removed(self, shard: str | None, after: str | None, got: FeedBatch,
                 events: list[ChangeEvent], behind: int) -> SourceBatch:
        """A read reached rows removed outside the purge: trim_policy decides."""
        removed = got.removed
        assert removed is not None and after is not None
        if self.cfg.trim_policy == "fail":
            raise ChangeLogGapError(change_log=str(self.reader.log), from_sequence=after, removed=removed)
        if got.resume is None:  # rows still in the log inside the range come first; the gap with the last of them
            return SourceBatch(shard, after, events, events[-1].sequence if events else None, behind=behind)
        gap = Gap(shard, after, str(removed.to_position), removed.describe())
        log.warning("channel %s: skipping removed change-log rows (trim_policy skip_to_trim_horizon): %s",
                    self.stream, gap.reason)
        return SourceBatch(shard, after, events, str(got.resume), gap=gap, behind=behind)

    def close(self) -> None:
        self.reader.close()


def build_supabase_source(config: ConsumerConfig, *, postgres_url: str | None = None,
                          on_call: CallHook | None = None,
                          reader: ChangeFeedReader | None = None) -> SupabaseChangeFeedSource:
    """The source of a consumer with a ``supabase`` source. ``reader`` replaces the one it would open
    (then no database URL is needed)."""
    cfg = config.source
    if not isinstance(cfg, SupabaseSourceConfig):
        raise ConfigError(f"consumer {config.name}: build_supabase_source needs a 'supabase' source, got {cfg.kind!r}")
    db_url = "" if reader is not None else resolve_db_url(cfg, postgres_url)
    return SupabaseChangeFeedSource(cfg, db_url=db_url, on_call=on_call, reader=reader)
