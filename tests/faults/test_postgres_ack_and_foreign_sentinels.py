"""Issue 21, item 9: a postgres-backend consumer's ack reports the advance its handler's transaction made (not
"unchanged" at every batch), and a ``SHARD_END`` another program put into ``checkpoint_sentinels`` ends the
shard for the hybrid backend exactly as for the postgres backend (one rule for both)."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from durability_pipelines.checkpoints import CheckpointKey
from durability_pipelines.consumer.runtime import open_runtime
from tests.support.sources import ListSource
from tests.support.stores import build_store
from tests.test_consumer_runtime import make_config


def test_a_postgres_backend_ack_reports_the_advance_made_in_the_handlers_transaction(redis_url: str,
                                                                                     postgres_url: str) -> None:
    stream = "orders-" + uuid.uuid4().hex[:10]
    source = ListSource.with_events(stream, 25)
    rt = open_runtime(make_config(stream, "postgres"), redis_url=redis_url, postgres_url=postgres_url, source=source)
    outcomes = []
    for _ in range(3):
        read = rt.read("shard-0", "run-" + uuid.uuid4().hex[:6])
        result = rt.ack(read, rt.process(read))
        rt.release(read.lease)
        assert result is not None
        outcomes.append((result.outcome.value, result.current))
    seqs = [e.sequence for e in source.shards_events["shard-0"]]
    assert outcomes == [("advanced", seqs[9]), ("advanced", seqs[19]), ("advanced", seqs[24])]
    history = rt.store.history(rt.key("shard-0"))
    assert [h.sequence for h in history] == [seqs[24], seqs[19], seqs[9]]  # one write per batch, no more
    rt.close()


FOREIGN_SENTINEL = """
INSERT INTO checkpoint_sentinels (adapter, stream, grp, consumer, shard, sentinel, ts)
VALUES (%s, %s, %s, %s, %s, 'SHARD_END', NOW())
"""


@pytest.mark.parametrize("backend", ["postgres", "hybrid"])
def test_a_foreign_shard_end_in_checkpoint_sentinels_ends_the_shard_on_both_backends(
        backend: str, redis_url: str, postgres_url: str) -> None:
    key = CheckpointKey("dynamodb", "orders-" + uuid.uuid4().hex[:10], "workers", "consumer-a", "shard-0")
    store = build_store(backend, redis_url, postgres_url, **({"flush_every_n": 1} if backend == "hybrid" else {}))
    assert store.save(key, "100000000000000000100").advanced
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(FOREIGN_SENTINEL, tuple(key.as_row().values()))
    assert store.load(key) == "SHARD_END"
    assert store.load_many([key]) == {key: "SHARD_END"}
    assert store.save(key, "100000000000000000200").outcome.value == "stale"
    store.close()
