"""Issue 21 item 6: a foreign Redis-only rewind is never silently undone.

The attack: a worker of the original pattern rewinds only the Redis key (a plain ``SET key seq EX 86400``, 20
records back) while the project's consumer runs; the consumer acks its next batch before any mirror runs.
Before the fix the monotonic save saw "stored < new", wrote over the rewind, and nothing reported it (audit
``ok``, no external row): the 20 records the other worker asked to replay were never replayed.

Expected (and documented in docs/operations.md, "Another worker moved a checkpoint back"): the save finds the
stored value below the project's own last recorded write, records the foreign move (Redis history, Postgres
``checkpoint_history``: the audit shows ``regressed-externally``, the summary behind ``no_checkpoint_regression``
counts it, never as the project's own regression) and honours it: nothing is written over it and the consumer
goes on from the rewound position, so the records are replayed. A later mirror run does not undo it either.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Sequence

import pytest

from durability_pipelines.audit.tables import build_checkpoint_audit, build_history_summary
from durability_pipelines.checkpoints import CheckpointKey, SaveContext, SaveOutcome
from durability_pipelines.consumer.drain import BatchRecord, DrainBudget, ShardDrainer, StopReason
from durability_pipelines.consumer.events import ChangeEvent
from durability_pipelines.consumer.handlers import HandlerContext, transactional
from durability_pipelines.consumer.runtime import open_runtime
from tests.support.shared_layout import Shared
from tests.support.sources import ListSource
from tests.support.stores import build_store
from tests.test_consumer_runtime import make_config

HANDLED: dict[str, list[str]] = {}


def counting(events: Sequence[ChangeEvent], ctx: HandlerContext) -> None:
    """A handler that records every sequence it is given (a replay shows as a sequence handled twice)."""
    HANDLED.setdefault(ctx.stream, []).extend(e.sequence for e in events)


@transactional
def counting_in_transaction(events: Sequence[ChangeEvent], ctx: HandlerContext) -> None:
    """``counting`` as a transactional handler: with the postgres backend its checkpoint is saved in its transaction."""
    counting(events, ctx)


@pytest.mark.parametrize("handler", ["counting", "counting_in_transaction"])
def test_a_plain_upsert_rewind_of_a_postgres_checkpoint_mid_run_is_reported_and_replayed(
        shared: Shared, handler: str) -> None:
    """The same attack on the postgres backend: the original pattern's plain UPSERT moves the row back 20 records
    while the consumer runs. The next save (alone, or in the handler's transaction) finds the row below its own
    last write, records the foreign move in checkpoint_history and writes nothing over it; the run replays."""
    stream = "rewind-" + uuid.uuid4().hex[:10]
    source = ListSource.with_events(stream, 60)
    events = source.shards_events["shard-0"]
    cfg = make_config(stream, "postgres", handler=f"{__name__}:{handler}", checkpoint={"backend": "postgres"})
    rt = open_runtime(cfg, redis_url=shared.redis_url, postgres_url=shared.postgres_url, source=source)
    key = rt.key("shard-0")
    rewound_to = events[9].sequence

    def other_worker_rewinds(record: BatchRecord) -> None:
        if record.index == 3:  # acked up to events[29]
            shared.other_upsert(key, rewound_to)

    report = ShardDrainer(rt, "shard-0", "run-1", DrainBudget(100, 60, 0), prefetch=False,
                          on_batch=other_worker_rewinds).run()
    assert report.stop_reason is StopReason.CAUGHT_UP
    handled = Counter(HANDLED[stream])
    assert all(handled[e.sequence] == 2 for e in events[10:30]), "the rewound-over records were not replayed"
    assert set(handled) == {e.sequence for e in events} and rt.store.load(key) == events[-1].sequence
    fourth = report.batches[3]
    assert fourth.outcome == SaveOutcome.REWOUND.value and fourth.checkpoint == rewound_to
    assert report.batches[4].start_after == rewound_to
    (foreign,) = [h for h in rt.store.history(key) if h.writer == "external"]
    assert (foreign.previous, foreign.sequence) == (events[29].sequence, rewound_to)
    assert foreign.reason == (f"foreign write seen by a save in postgres: moved back from {events[29].sequence} "
                              f"to {rewound_to}")
    summary = build_history_summary(shared.db())
    assert int(summary["external_regressions_recent"].sum()) == 1 and int(summary["regressions"].sum()) == 0
    rt.close()


@pytest.mark.parametrize("backend", ["redis", "hybrid"])
def test_a_redis_only_rewind_mid_run_is_reported_and_replayed(shared: Shared, backend: str) -> None:
    stream = "rewind-" + uuid.uuid4().hex[:10]
    source = ListSource.with_events(stream, 60)
    events = source.shards_events["shard-0"]
    cfg = make_config(stream, backend, handler=f"{__name__}:counting",
                      checkpoint={"backend": backend, "flush_every_n": 1})
    rt = open_runtime(cfg, redis_url=shared.redis_url, postgres_url=shared.postgres_url, source=source)
    key = rt.key("shard-0")
    rewound_to = events[9].sequence

    def other_worker_rewinds(record: BatchRecord) -> None:
        if record.index == 3:  # acked up to events[29]; the other worker asks for a replay from events[9]
            shared.other_set(key.redis_key, rewound_to)

    report = ShardDrainer(rt, "shard-0", "run-1", DrainBudget(100, 60, 0), prefetch=False,
                          on_batch=other_worker_rewinds).run()
    assert report.stop_reason is StopReason.CAUGHT_UP
    handled = Counter(HANDLED[stream])
    replayed = [e.sequence for e in events[10:30]]
    assert all(handled[s] == 2 for s in replayed), "the 20 records the other worker rewound over were not replayed"
    assert set(handled) == {e.sequence for e in events} and rt.store.load(key) == events[-1].sequence
    # the batch whose ack found the rewind: nothing written over it, the run went on from it
    fourth = report.batches[3]
    assert fourth.outcome == SaveOutcome.REWOUND.value and fourth.checkpoint == rewound_to
    assert report.batches[4].start_after == rewound_to
    # reported: history (both stores), the audit, and the summary behind no_checkpoint_regression
    redis_history = rt.store.redis.history(key) if backend == "hybrid" else rt.store.history(key)
    (foreign,) = [h for h in redis_history if h.writer == "external"]
    assert (foreign.previous, foreign.sequence) == (events[29].sequence, rewound_to)
    assert foreign.reason == f"foreign write seen by a save in redis: moved back from {events[29].sequence} to {rewound_to}"
    summary = build_history_summary(shared.db())
    assert int(summary["external_regressions_recent"].sum()) == 1 and int(summary["regressions"].sum()) == 0
    (row,) = build_checkpoint_audit(shared.client, shared.db(), []).itertuples()
    assert row.status == "regressed-externally"
    assert f"Redis moved back from {events[29].sequence} to {rewound_to}" in row.detail
    rt.close()


def test_a_redis_only_rewind_the_project_saw_first_is_not_undone_by_the_mirror(shared: Shared) -> None:
    k = CheckpointKey("dynamodb", "orders", "workers", "consumer-a", "shard-0")
    store = build_store("hybrid", shared.redis_url, shared.postgres_url, flush_every_n=1)
    assert store.save(k, "1000", context=SaveContext(writer="run-1")).advanced
    shared.other_set(k.redis_key, "700")
    result = store.save(k, "1040", context=SaveContext(writer="run-1", run_id="run-1"))
    assert result.outcome is SaveOutcome.REWOUND and (result.moved_back_from, result.current) == ("1000", "700")
    assert shared.client.get(k.redis_key) == b"700" and shared.client.ttl(k.redis_key) > 0  # as the worker left it
    for _ in range(2):  # nor by the mirror, run after run, though Postgres is still at 1000
        report = shared.mirror()
        assert report.restored_to_redis == 0 and report.external_regressions == []
        assert shared.client.get(k.redis_key) == b"700"
    assert store.load(k) == "700"
    assert store.save(k, "710", context=SaveContext(writer="run-2")).advanced  # the replay goes on from it
    summary = build_history_summary(shared.db())
    assert int(summary["external_regressions"].sum()) == 1 and int(summary["regressions"].sum()) == 0
    store.close()


def test_a_rewind_the_mirror_saw_first_is_recorded_once_and_kept(shared: Shared) -> None:
    k = CheckpointKey("dynamodb", "orders", "workers", "consumer-a", "shard-0")
    store = build_store("redis", shared.redis_url, shared.postgres_url)
    assert store.save(k, "1000").advanced
    shared.mirror()
    shared.other_set(k.redis_key, "700")
    assert len(shared.mirror().external_regressions) == 1
    assert shared.mirror().restored_to_redis == 0 and shared.client.get(k.redis_key) == b"700"  # second run too
    assert store.save(k, "800").advanced  # recorded already: the project goes on from it, no second report
    assert int(build_history_summary(shared.db())["external_regressions"].sum()) == 1
    store.close()
