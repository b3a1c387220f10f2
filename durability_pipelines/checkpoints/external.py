"""What the history calls a write the project did not make: its writer, its reason texts, and the row that
records one (``checkpoint_history``). A module of its own, below both the stores and ``inspect``: a save that
finds a foreign move records it in the store's own transaction."""

from __future__ import annotations

import re
from typing import Any

from durability_pipelines.checkpoints.keys import CheckpointKey

#: The writer name of a history entry that records a write the project did not make (seen by the mirror).
EXTERNAL_WRITER = "external"
_EXTERNAL_REASON = "foreign write seen by the mirror in {store}: moved backwards"


def external_reason(store: str) -> str:
    """The reason of an ``external`` history entry; it names the store that was moved back."""
    return _EXTERNAL_REASON.format(store=store)


#: What a save writes when it finds the shared value below the project's last recorded write (checkpoint.lua).
_SAVE_EXTERNAL_REASON = "foreign write seen by a save in {store}: moved back from {frm} to {to}"
_EXTERNAL_REASON_RE = re.compile(r"^foreign write seen by (?:the mirror|a save) in (redis|postgres):")


def save_external_reason(store: str, frm: str, to: str) -> str:
    """The reason of the ``external`` history entry a save records (the Lua script writes the same text)."""
    return _SAVE_EXTERNAL_REASON.format(store=store, frm=frm, to=to)


def external_store(reason: str | None) -> str | None:
    """Which store an ``external`` history entry says was moved back (None if it is not one): recorded by the
    mirror or by a save."""
    m = _EXTERNAL_REASON_RE.match(reason or "")
    return m.group(1) if m else None


_RECORD_EXTERNAL_SQL = """
INSERT INTO checkpoint_history (adapter, stream, grp, consumer, shard, previous_sequence, new_sequence, writer,
                                run_id, reason)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
"""


def record_external_on(conn: Any, key: CheckpointKey, frm: str, to: str, *, store: str,
                       run_id: str | None = None) -> None:
    """``record_external`` on a connection the caller holds (in the transaction of the save that found it)."""
    conn.execute(_RECORD_EXTERNAL_SQL, (*key.as_row().values(), frm, to, EXTERNAL_WRITER, run_id,
                                        save_external_reason(store, frm, to)))
