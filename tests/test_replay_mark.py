"""The replay mark (``checkpoints/replay.py``): the highest position the project recorded for a checkpoint since
the last deliberate move, read from the history every backend already keeps (no key or table of its own)."""

from __future__ import annotations

from durability_pipelines.checkpoints import CheckpointStore, SaveContext, SaveOutcome
from durability_pipelines.checkpoints.base import forced_reason
from durability_pipelines.checkpoints.hybrid import HybridCheckpointStore
from durability_pipelines.checkpoints.replay import below_mark, replay_mark
from tests.support.stores import build_store, unique_key

OPERATOR = SaveContext(writer="oncall", reason=forced_reason("rewind to sequence 120: INC-1"))


def test_the_mark_is_the_newest_own_write_and_a_deliberate_rewind_lowers_it(store: CheckpointStore) -> None:
    key = unique_key()
    assert replay_mark(store, key) is None and below_mark(store, key, None) is None  # never recorded: no mark
    for seq in ("100", "200"):
        store.save(key, seq, context=SaveContext(writer="run-1"))
    store.flush()
    mark = replay_mark(store, key)
    assert mark is not None and (mark.sequence, mark.writer, mark.deliberate) == ("200", "run-1", False)
    regression = below_mark(store, key, "150")
    assert regression is not None and (regression.found, regression.mark.sequence) == ("150", "200")
    assert below_mark(store, key, None) is not None  # a checkpoint gone while the history has one
    assert below_mark(store, key, "200") is None and below_mark(store, key, "250") is None

    store.force_set(key, "120", context=OPERATOR)  # the operator's rewind: replay allowed from 120
    mark = replay_mark(store, key)
    assert mark is not None and (mark.sequence, mark.deliberate) == ("120", True)
    assert below_mark(store, key, "120") is None and below_mark(store, key, "110") is not None
    store.save(key, "130", context=SaveContext(writer="run-2"))
    store.flush()
    assert replay_mark(store, key).sequence == "130"  # type: ignore[union-attr]


def test_a_foreign_move_the_project_recorded_is_no_mark_but_names_who(redis_url: str, postgres_url: str) -> None:
    store = build_store("redis", redis_url, postgres_url)
    key = unique_key()
    store.save(key, "1000", context=SaveContext(writer="run-1"))
    store.client.set(key.redis_key, "700", ex=86400)  # type: ignore[attr-defined]  # the original pattern's SET
    assert store.save(key, "1040", context=SaveContext(writer="run-1")).outcome is SaveOutcome.REWOUND
    regression = below_mark(store, key, store.load(key))
    assert regression is not None and regression.mark.sequence == "1000"
    assert "foreign write seen by a save in redis: moved back from 1000 to 700" in regression.who()
    store.close()


def test_a_hybrid_rewind_written_to_one_part_outranks_the_older_mark_of_the_other(
        redis_url: str, postgres_url: str) -> None:
    store = build_store("hybrid", redis_url, postgres_url, flush_every_n=1)
    assert isinstance(store, HybridCheckpointStore)
    key = unique_key()
    store.save(key, "200", context=SaveContext(writer="run-1"))
    assert store.postgres.load(key) == "200"
    store.redis.force_set(key, "120", context=OPERATOR)  # `checkpoints rewind --backend redis`
    mark = replay_mark(store, key)
    assert mark is not None and (mark.sequence, mark.store, mark.deliberate) == ("120", "redis", True)
    store.close()


def test_history_turned_off_gives_no_mark_rather_than_a_wrong_one(redis_url: str, postgres_url: str) -> None:
    store = build_store("redis", redis_url, postgres_url, history_maxlen=0)
    key = unique_key()
    store.save(key, "200", context=SaveContext(writer="run-1"))
    assert replay_mark(store, key) is None  # documented: a non-idempotent consumer needs history (the default)
    store.close()
