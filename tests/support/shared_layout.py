"""The shared layout's other worker: a worker of the original pattern, written with nothing of ours (raw redis-py
``GET`` / ``SET key seq EX 86400`` and the pattern's own UPSERT / SELECT on ``checkpoints``), and what the
``shared`` fixture (``tests/conftest.py``) hands a test: a database of its own and the session's own Redis server
(the mirror and the audit read every key).
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
import redis

from durability_pipelines.checkpoints import CheckpointKey
from durability_pipelines.checkpoints.mirror import CheckpointMirror
from durability_pipelines.checkpoints.postgres_store import PostgresConnection

# The original pattern's SQL, verbatim in spirit: a plain upsert and a plain select.
ORIGINAL_UPSERT = """
INSERT INTO checkpoints (adapter, stream, grp, consumer, shard, sequence, ts)
VALUES (%s, %s, %s, %s, %s, %s, NOW())
ON CONFLICT (adapter, stream, grp, consumer, shard) DO UPDATE SET sequence = EXCLUDED.sequence, ts = NOW()
"""
ORIGINAL_SELECT = "SELECT sequence FROM checkpoints WHERE adapter = %s AND stream = %s AND grp = %s AND consumer = %s AND shard = %s"


@dataclass
class Shared:
    postgres_url: str
    redis_url: str
    client: redis.Redis

    def db(self) -> PostgresConnection:
        return PostgresConnection(self.postgres_url)

    # -- the other worker (original pattern) ----------------------------------------------------
    def other_set(self, redis_key: str, seq: str) -> None:
        self.client.set(redis_key, seq, ex=86400)

    def other_upsert(self, key: CheckpointKey, seq: str) -> None:
        with psycopg.connect(self.postgres_url, autocommit=True) as conn:
            conn.execute(ORIGINAL_UPSERT, (*key.as_row().values(), seq))

    def other_select(self, key: CheckpointKey) -> str | None:
        with psycopg.connect(self.postgres_url) as conn:
            row = conn.execute(ORIGINAL_SELECT, tuple(key.as_row().values())).fetchone()
        return row[0] if row else None

    def rows(self) -> list[tuple[str, ...]]:
        with psycopg.connect(self.postgres_url) as conn:
            return conn.execute("SELECT adapter, stream, grp, consumer, shard, sequence FROM checkpoints "
                                "ORDER BY 1, 2, 3, 4, 5").fetchall()

    def mirror(self, **kwargs: object):
        return CheckpointMirror(self.client, self.db(), **kwargs).run()  # type: ignore[arg-type]
