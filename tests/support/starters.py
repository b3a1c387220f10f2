"""The environment the repo's starter consumers run in during tests.

The starters use fixed names (table and topic ``orders``, consumer ``consumer-a``), so each test
starts from a clean slate for them: their Redis keys and rows are removed and moto is reset.
"""

from __future__ import annotations

import contextlib
import urllib.request
from collections.abc import Iterator

import psycopg
import pytest
import redis

from tests.support.dynamodb import AWS_TEST_ENV, moto_server

STARTER_TABLES = ("checkpoints", "checkpoint_history", "checkpoint_leases", "stream_events", "stream_gaps",
                  "dead_letters", "sensor_cursors")


@contextlib.contextmanager
def starter_environment(monkeypatch: pytest.MonkeyPatch, postgres_url: str, redis_url: str) -> Iterator[str]:
    """Point the starters at the test servers and a fresh, empty moto server; yields its URL."""
    for k, v in AWS_TEST_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("DURABILITY_POSTGRES_URL", postgres_url)
    monkeypatch.setenv("DURABILITY_REDIS_URL", redis_url)
    monkeypatch.delenv("DURABILITY_CONSUMERS_DIR", raising=False)
    client = redis.Redis.from_url(redis_url)
    for pattern in ("checkpoint:*:orders*", "durability:*orders*"):
        for k in client.scan_iter(match=pattern):
            client.delete(k)
    client.close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        for table in STARTER_TABLES:
            conn.execute(f"DO $$ BEGIN IF to_regclass('{table}') IS NOT NULL THEN DELETE FROM {table}; END IF; END $$")
    with moto_server() as url:
        # moto's state is process-wide, shared by every server in this process: start empty.
        urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST")).read()
        monkeypatch.setenv("DURABILITY_DYNAMODB_ENDPOINT_URL", url)
        yield url
