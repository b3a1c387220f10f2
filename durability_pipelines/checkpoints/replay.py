"""The replay mark: the highest position the project recorded for a checkpoint, and whether a loaded one is below it.

A consumer whose sink is not idempotent (a Realtime broadcast) must not replay because another worker moved its
checkpoint back: the replay would publish every event in between again. It needs, per checkpoint, "the highest
position the project ever recorded", reset only by a deliberate operator move (``checkpoints rewind`` / ``set
--force``, which records where replay is allowed from).

No new key or table holds it: every backend already records the project's own writes in its history (the Redis
history stream, Postgres ``checkpoint_history``, the memory store's list), monotonic saves only ever append
higher positions, and a foreign writer (a plain ``SET`` / UPSERT) appends nothing. So the mark is **the newest
history entry the project wrote** (``writer`` other than ``external``: those record foreign moves the project
saw): it is the highest own position since the last deliberate move, and a deliberate move is itself such an
entry (reason ``force: ...``), which lowers the mark to where the operator asked the replay to start. A hybrid
store reads both parts and keeps the higher mark, except that a deliberate move in one part outranks the older
entries of the other (a rewind written to both parts is one decision). See docs/durability-patterns.md.

Nothing here imports Dagster.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from durability_pipelines.checkpoints.base import FORCED_REASON_PREFIX, CheckpointStore, HistoryEntry
from durability_pipelines.checkpoints.errors import InvalidSequenceError, StoreUnavailableError
from durability_pipelines.checkpoints.inspect import EXTERNAL_WRITER
from durability_pipelines.checkpoints.keys import CheckpointKey
from durability_pipelines.checkpoints.ordering import normalize_sequence, sort_key

#: History entries read per store to find the newest own one: foreign moves are recorded once each, so a
#: handful of ``external`` entries at most sit above it.
MARK_SCAN = 50


@dataclass(frozen=True)
class ReplayMark:
    """The newest position the project itself recorded for one checkpoint (in one store's history)."""

    sequence: str  # canonical
    store: str  # the part whose history holds it: memory | redis | postgres
    writer: str | None
    at: datetime | None
    reason: str | None
    #: an operator's deliberate move (``checkpoints rewind`` / ``set --force``): replay is allowed from here
    deliberate: bool
    #: foreign moves recorded after it (``external`` entries, newest first): who moved the checkpoint, if seen
    foreign: tuple[HistoryEntry, ...] = ()


@dataclass(frozen=True)
class Regression:
    """A loaded checkpoint below its replay mark: loading it would replay ``found``..``mark.sequence``."""

    key: CheckpointKey
    found: str | None
    mark: ReplayMark

    def who(self) -> str:
        """Who moved it back, as far as the histories know."""
        for entry in self.mark.foreign:
            if entry.sequence == self.found:
                seen = f" at {entry.ts:%Y-%m-%dT%H:%M:%SZ}" if entry.ts else ""
                return f"a write the project did not make ({entry.reason or 'recorded as external'}{seen})"
        return ("a write the project did not make and no history records (another worker of the original "
                "pattern, a manual SET / UPDATE, a restore?)")


def _own_mark(name: str, entries: Sequence[HistoryEntry]) -> ReplayMark | None:
    foreign: list[HistoryEntry] = []
    for entry in entries:  # newest first
        if entry.writer == EXTERNAL_WRITER:
            foreign.append(entry)
            continue
        try:
            sequence = normalize_sequence(entry.sequence)
        except InvalidSequenceError:
            continue  # not a position (an old or hand-written entry): the next one is
        return ReplayMark(sequence, name, entry.writer, entry.ts, entry.reason,
                          (entry.reason or "").startswith(FORCED_REASON_PREFIX), tuple(foreign))
    return None


def replay_mark(store: CheckpointStore, key: CheckpointKey, *, scan: int = MARK_SCAN) -> ReplayMark | None:
    """The highest position the project recorded for ``key`` since the last deliberate move; None if it never
    recorded one (a new checkpoint, or history turned off: ``history_maxlen: 0``).

    A part that is down is skipped when another one answers (hybrid reads on from Postgres when Redis is down);
    when none answers the error propagates (the load failed the same way)."""
    marks: list[ReplayMark] = []
    parts = store.parts()
    errors: list[StoreUnavailableError] = []
    for name, part in parts:
        try:
            found = _own_mark(name, part.history(key, scan))
        except StoreUnavailableError as exc:
            errors.append(exc)
            continue
        if found is not None:
            marks.append(found)
    if errors and len(errors) == len(parts):
        raise errors[0]
    if not marks:
        return None
    decisions = [m for m in marks if m.deliberate and m.at is not None]
    if decisions:  # the newest operator move outranks whatever any part recorded before it
        latest = max(decisions, key=lambda m: m.at)  # type: ignore[arg-type, return-value]
        assert latest.at is not None
        marks = [m for m in marks if m is latest or m.at is None or m.at > latest.at]
    return max(marks, key=lambda m: sort_key(m.sequence))


def below_mark(store: CheckpointStore, key: CheckpointKey, loaded: str | None) -> Regression | None:
    """The regression if ``loaded`` (what the store's load returned; None: no checkpoint) is below ``key``'s
    replay mark, else None. A checkpoint at or above its mark, or one the project never recorded, is fine."""
    mark = replay_mark(store, key)
    if mark is None:
        return None
    if loaded is not None and sort_key(loaded) >= sort_key(mark.sequence):
        return None
    return Regression(key, loaded, mark)
