"""The shared layout, shared honestly: another worker of the original pattern writes beside the project.

The other worker's side is written exactly as the original pattern does it, with nothing of ours: raw
redis-py ``GET`` / ``SET key seq EX 86400`` and the pattern's own UPSERT / SELECT on ``checkpoints``.
Each test runs on a database of its own and the session's own Redis server, emptied for it (the mirror and the audit read every key).
"""

from __future__ import annotations

import psycopg
import pytest

from durability_pipelines.audit.tables import build_checkpoint_audit, build_history_summary
from durability_pipelines.checkpoints import CheckpointKey, SaveContext
from durability_pipelines.checkpoints.inspect import snapshot
from durability_pipelines.checkpoints.postgres_store import PostgresCheckpointStore
from durability_pipelines.checkpoints.redis_store import RedisCheckpointStore
from tests.support.shared_layout import ORIGINAL_UPSERT, Shared
from tests.support.stores import build_store


def hybrid(shared: Shared, **kwargs: object):
    return build_store("hybrid", shared.redis_url, shared.postgres_url, **kwargs)


# --------------------------------------------------------------------------- keys with ':' in a channel


TEMPLATE_KEY = "checkpoint:supabase:realtime:public:orders:workers:consumer-a"  # the original template's


def test_the_original_templates_supabase_key_round_trips_through_every_path(shared: Shared) -> None:
    key = CheckpointKey.parse(TEMPLATE_KEY)
    assert (key.adapter, key.stream, key.group, key.consumer, key.shard) == (
        "supabase", "realtime:public:orders", "workers", "consumer-a", None)
    assert key.redis_key == TEMPLATE_KEY
    shared.other_set(TEMPLATE_KEY, "11870000000000000000300")
    store = hybrid(shared, flush_every_n=1)
    assert store.load(key) == "11870000000000000000300"
    assert store.save(key, "11870000000000000000400").advanced
    assert shared.client.get(TEMPLATE_KEY) == b"11870000000000000000400"
    assert shared.other_select(key) == "11870000000000000000400"  # the row the template's SELECT reads
    report = shared.mirror()
    assert report.skipped == [] and report.redis_keys == 1
    (state,) = snapshot(shared.client, shared.db())
    assert state.key == key and state.drift[0].value == "in-sync"
    df = build_checkpoint_audit(shared.client, shared.db(), [])
    assert list(df["stream"]) == ["realtime:public:orders"] and list(df["status"]) == ["ok"]
    shared.client.delete(TEMPLATE_KEY)  # Redis lost it: the mirror restores it from Postgres
    assert shared.mirror().restored_to_redis == 1
    assert shared.client.get(TEMPLATE_KEY) == b"11870000000000000000400"
    store.close()


def test_a_channel_with_a_colon_is_never_split_into_group_and_consumer(shared: Shared) -> None:
    shared.other_set("checkpoint:supabase:room:1:workers:consumer-a", "500")
    shared.mirror()
    assert shared.rows() == [("supabase", "room:1", "workers", "consumer-a", "", "500")]


def test_a_key_that_cannot_be_split_is_reported_and_never_copied(shared: Shared) -> None:
    bad = ["checkpoint:dynamodb:orders:workers:" + "y" * 300 + ":shard-2",  # a component too long
           "checkpoint:dynamodb:orders:workers :consumer-a:shard-2",  # trailing space
           "checkpoint:dynamodb:orders\tx:workers:consumer-a:shard-2",  # a tab
           "checkpoint:dynamodb:a:b:c:d:e:f"]  # too many parts
    for k in bad:
        shared.client.set(k, "900")
    good = CheckpointKey("dynamodb", "orders", "workers", "consumer-a", "shard-1")
    shared.client.set(good.redis_key, "901")
    report = shared.mirror()
    assert sorted(s.key for s in report.skipped if s.why == "unparseable") == sorted(bad)
    assert shared.rows() == [("dynamodb", "orders", "workers", "consumer-a", "shard-1", "901")]
    df = build_checkpoint_audit(shared.client, shared.db(), []).set_index("checkpoint_key")
    assert {df.loc[k, "status"] for k in bad} == {"unparseable"} and df.loc[good.redis_key, "status"] == "ok"
    # the runbook's Redis-loss procedure still restores everything restorable
    shared.client.flushdb()
    assert shared.mirror().restored_to_redis == 1 and shared.client.get(good.redis_key) == b"901"


def test_one_garbage_postgres_row_stops_nothing_else(shared: Shared) -> None:
    keys = [CheckpointKey("dynamodb", "orders", "workers", "consumer-a", f"shard-{i}") for i in range(3)]
    for i, k in enumerate(keys):
        shared.client.set(k.redis_key, str(1000 + i))
    shared.mirror()
    with psycopg.connect(shared.postgres_url, autocommit=True) as conn:
        conn.execute("UPDATE checkpoints SET sequence = '12x' WHERE shard = 'shard-1'")
        # a row of another worker with a component the layout cannot express
        conn.execute(ORIGINAL_UPSERT, ("dynamodb", "orders", "workers", "y" * 300, "shard-9", "77"))
    for i, k in enumerate(keys):
        shared.client.set(k.redis_key, str(2000 + i))  # every key advanced in Redis
    shared.client.delete(keys[2].redis_key)  # and one lost there
    report = shared.mirror()
    why = {(s.where, s.key, s.why) for s in report.skipped}
    assert ("postgres", keys[1].redis_key, "invalid") in why
    assert ("postgres", "checkpoint:dynamodb:orders:workers:" + "y" * 300 + ":shard-9", "unparseable") in why
    assert report.mirrored_to_postgres == 1 and report.restored_to_redis == 1  # shard-0 copied, shard-2 restored
    assert shared.other_select(keys[0]) == "2000" and shared.other_select(keys[1]) == "12x"  # left for the operator
    assert shared.client.get(keys[2].redis_key) == b"1002"
    assert not shared.client.exists("checkpoint:dynamodb:orders:workers:" + "y" * 300 + ":shard-9")


def test_a_wrong_type_key_is_reported_by_the_mirror_and_never_overwritten_by_it(shared: Shared) -> None:
    k = CheckpointKey("dynamodb", "orders", "workers", "consumer-a", "shard-0")
    shared.other_upsert(k, "100")
    shared.client.hset(k.redis_key, "sequence", "100")
    report = shared.mirror()
    assert [(s.key, s.why) for s in report.skipped] == [(k.redis_key, "wrong-type")]
    assert shared.client.type(k.redis_key) == b"hash"
    (row,) = build_checkpoint_audit(shared.client, shared.db(), []).itertuples()
    assert row.status == "wrong-type" and "checkpoints set" in row.detail and row.redis_value == "<redis hash>"


# --------------------------------------------------------------------------- other writers


def foreign_setup(shared: Shared) -> tuple[CheckpointKey, object]:
    """The project at 1000 in both stores, with history in both."""
    k = CheckpointKey("dynamodb", "orders", "workers", "consumer-a", "shard-0")
    store = hybrid(shared, flush_every_n=1)
    assert store.save(k, "1000", context=SaveContext(writer="run-1")).advanced
    return k, store


@pytest.mark.parametrize("lowered", ["redis", "postgres", "both"])
def test_a_foreign_lower_write_is_reported_left_as_found_and_not_charged_to_the_project(shared: Shared,
                                                                                       lowered: str) -> None:
    k, store = foreign_setup(shared)
    if lowered in ("redis", "both"):
        shared.other_set(k.redis_key, "700")
    if lowered in ("postgres", "both"):
        shared.other_upsert(k, "700")
    report = shared.mirror()
    stores = {"redis": ["redis"], "postgres": ["postgres"], "both": ["postgres", "redis"]}[lowered]
    assert sorted(s.where for s in report.external_regressions) == stores
    # left as found: the mirror never silently undoes another worker's write (nor drops its TTL)
    if lowered in ("redis", "both"):
        assert shared.client.get(k.redis_key) == b"700" and shared.client.ttl(k.redis_key) > 0
    if lowered in ("postgres", "both"):
        assert shared.other_select(k) == "700"
    df = build_checkpoint_audit(shared.client, shared.db(), [])
    (row,) = df.itertuples()
    assert row.status == "regressed-externally"
    assert "1000" in row.detail and "700" in row.detail and "checkpoints repair" in row.detail
    for name in stores:
        assert f"{name.capitalize()} moved back from 1000 to 700" in row.detail  # the right store, the right way
    summary = build_history_summary(shared.db())
    assert int(summary["regressions"].sum()) == 0  # nothing charged to the project
    assert int(summary["external_regressions_recent"].sum()) >= 1
    # a later project save is an advance, not the project's regression
    assert store.save(k, "800", context=SaveContext(writer="run-2")).advanced or lowered == "postgres"
    shared.mirror()
    summary = build_history_summary(shared.db())
    assert int(summary["regressions"].sum()) == 0
    store.close()


def test_the_operator_can_have_the_mirror_repair_a_foreign_regression(shared: Shared) -> None:
    k, store = foreign_setup(shared)
    shared.other_set(k.redis_key, "700")
    shared.other_upsert(k, "700")
    report = shared.mirror(repair=True)
    assert report.repaired == 2
    assert shared.client.get(k.redis_key) == b"1000" and shared.other_select(k) == "1000"
    reasons = [h.reason for h in PostgresCheckpointStore(shared.postgres_url).history(k)]
    assert "repair: undo a foreign regression" in reasons
    assert int(build_history_summary(shared.db())["regressions"].sum()) == 0
    store.close()


def test_a_project_save_after_an_unseen_foreign_write_is_not_the_projects_regression(shared: Shared) -> None:
    """The other worker lowers both stores and the project saves again before any mirror runs: the save reports
    the foreign move and honours it (issue 21 item 6); the next save goes on from it."""
    k, store = foreign_setup(shared)
    shared.other_set(k.redis_key, "700")
    shared.other_upsert(k, "700")
    result = store.save(k, "1040", context=SaveContext(writer="run-2"))
    assert result.outcome.value == "rewound" and result.current == "700" and shared.client.get(k.redis_key) == b"700"
    assert store.save(k, "800", context=SaveContext(writer="run-2")).advanced
    summary = build_history_summary(shared.db())
    assert int(summary["regressions"].sum()) == 0 and int(summary["external_regressions"].sum()) >= 1
    store.close()


# --------------------------------------------------------------------------- TTL


def test_another_workers_ttl_survives_a_project_save_and_a_configured_ttl_wins(shared: Shared) -> None:
    k = CheckpointKey("dynamodb", "orders", "workers", "consumer-a", "shard-0")
    shared.other_set(k.redis_key, "100")  # SET ... EX 86400
    assert RedisCheckpointStore(shared.client).save(k, "200").advanced
    assert shared.client.get(k.redis_key) == b"200" and 86_000 < shared.client.ttl(k.redis_key) <= 86_400
    assert RedisCheckpointStore(shared.client, ttl_s=3600).save(k, "300").advanced
    assert 3_500 < shared.client.ttl(k.redis_key) <= 3_600
    fresh = CheckpointKey("dynamodb", "orders", "workers", "consumer-a", "shard-1")
    assert RedisCheckpointStore(shared.client).save(fresh, "1").advanced
    assert shared.client.ttl(fresh.redis_key) == -1  # no TTL of its own: none


def test_checkpoints_repair_puts_the_last_recorded_position_back(shared: Shared, monkeypatch, capsys) -> None:
    from durability_pipelines.cli import main

    k, store = foreign_setup(shared)
    shared.other_set(k.redis_key, "700")
    shared.other_upsert(k, "700")
    shared.mirror()  # recorded as foreign, left as found
    monkeypatch.setenv("DURABILITY_POSTGRES_URL", shared.postgres_url)
    monkeypatch.setenv("DURABILITY_REDIS_URL", shared.redis_url)
    assert main(["checkpoints", "repair", k.redis_key, "--by", "ops@test"]) == 0
    out = capsys.readouterr().out
    assert "repaired" in out and "1000" in out
    assert shared.client.get(k.redis_key) == b"1000" and shared.other_select(k) == "1000"
    (latest, *_) = PostgresCheckpointStore(shared.postgres_url).history(k)
    assert latest.sequence == "1000" and latest.writer == "ops@test" and "repair" in (latest.reason or "")
    assert int(build_history_summary(shared.db())["regressions"].sum()) == 0
    store.close()
