"""Shards read to their end: ``SHARD_END`` lives in the project's sentinel places (``durability:sentinel:*``,
``checkpoint_sentinels``), the shared key and row keep the last number. Nothing about that is a regression,
and nothing the project writes puts ``SHARD_END`` into what other workers read (issue 21, items 7 and 8).
"""

from __future__ import annotations

import pytest

from durability_pipelines.audit.tables import build_checkpoint_audit, build_history_summary
from durability_pipelines.checkpoints import CheckpointKey
from durability_pipelines.checkpoints.inspect import snapshot
from durability_pipelines.checkpoints.mirror import repair_key
from tests.support.shared_layout import Shared
from tests.support.stores import build_store

BASE = 10**20


def _end_shards(shared: Shared, backend: str, n: int = 3) -> list[CheckpointKey]:
    """What a consumer does at each shard's end: save the last record's number, then SHARD_END."""
    store = build_store(backend, shared.redis_url, shared.postgres_url)
    keys = [CheckpointKey("dynamodb", "orders", "workers", "consumer-a", f"shard-{i}") for i in range(n)]
    for i, key in enumerate(keys):
        assert store.save(key, str(BASE + 10 * i)).advanced
        assert store.save(key, "SHARD_END").advanced
    store.close()
    return keys


def _shared_values(shared: Shared, keys: list[CheckpointKey]) -> list[tuple[bytes | None, str | None]]:
    return [(shared.client.get(k.redis_key), shared.other_select(k)) for k in keys]


@pytest.mark.parametrize("backend", ["hybrid", "redis", "postgres"])
def test_an_ended_shard_is_no_regression_for_the_mirror_the_audit_or_the_checks(shared: Shared, backend: str) -> None:
    keys = _end_shards(shared, backend)
    for _ in range(2):  # the first run copies, the second finds everything as it left it
        report = shared.mirror()
        assert report.external_regressions == [] and report.skipped == []
    assert all(st.external_regressions == [] for st in snapshot(shared.client, shared.db()))
    audit = build_checkpoint_audit(shared.client, shared.db(), [])
    assert list(audit["status"]) == ["ok"] * len(keys), audit[["checkpoint_key", "status", "detail"]].to_string()
    summary = build_history_summary(shared.db())
    assert int(summary["external_regressions"].sum()) == 0 and int(summary["regressions"].sum()) == 0
    # the other worker reads numbers only; the project still reads the end
    assert _shared_values(shared, keys) == [(str(BASE + 10 * i).encode(), str(BASE + 10 * i)) for i in range(3)]
    store = build_store(backend, shared.redis_url, shared.postgres_url)
    assert [store.load(k) for k in keys] == ["SHARD_END"] * 3
    store.close()


def test_a_foreign_rewind_of_an_ended_shards_number_is_reported_against_the_number(shared: Shared) -> None:
    """The other worker lowers the shared number of an ended shard: that *is* a foreign move (of the number the
    project recorded), and the report names numbers, never SHARD_END as what the key held."""
    (key,) = _end_shards(shared, "hybrid", 1)
    shared.mirror()
    shared.other_set(key.redis_key, str(BASE - 5))
    report = shared.mirror()
    (found,) = report.external_regressions
    assert found.key == key.redis_key and str(BASE) in found.detail and "SHARD_END" not in found.detail


@pytest.mark.parametrize("how", ["repair", "mirror-repair"])
def test_repairing_an_ended_shard_writes_numbers_into_the_shared_key_and_row(shared: Shared, how: str) -> None:
    (key,) = _end_shards(shared, "hybrid", 1)
    shared.mirror()
    shared.other_set(key.redis_key, str(BASE - 5))  # the other worker rewinds both, with its own SET / UPSERT
    shared.other_upsert(key, str(BASE - 5))
    if how == "repair":
        result = repair_key(shared.client, shared.db(), key, by="test")
        assert result.target is not None
    else:
        shared.mirror(repair=True)
    assert _shared_values(shared, [key]) == [(str(BASE).encode(), str(BASE))]  # the number, never SHARD_END
    hybrid = build_store("hybrid", shared.redis_url, shared.postgres_url)
    assert hybrid.load(key) == "SHARD_END"  # the end is still where the project keeps it
    hybrid.close()


def test_a_sentinel_found_in_a_shared_key_is_never_mirrored_into_the_shared_row(shared: Shared) -> None:
    key = CheckpointKey("dynamodb", "orders", "workers", "consumer-a", "shard-9")
    shared.other_upsert(key, str(BASE))
    shared.client.set(key.redis_key, "SHARD_END")  # an older version's (or another program's) write
    report = shared.mirror()
    assert [(s.key, s.why) for s in report.skipped] == [(key.redis_key, "invalid")]
    assert "migrate" in report.skipped[0].detail
    assert shared.other_select(key) == str(BASE)
