"""8 processes race to save increasing checkpoints for one key: nothing regresses."""

from __future__ import annotations

import multiprocessing as mp
import random

import pytest

from durability_pipelines.checkpoints import SaveContext
from durability_pipelines.checkpoints.ordering import sort_key
from tests.support.stores import build_store, unique_key

WORKERS = 8
SAVES_PER_WORKER = 150


def _race(backend: str, redis_url: str, postgres_url: str, key_parts: tuple, worker: int,
          barrier: mp.synchronize.Barrier, out: mp.Queue) -> None:
    from durability_pipelines.checkpoints import CheckpointKey

    key = CheckpointKey(*key_parts)
    store = build_store(backend, redis_url, postgres_url, **({"flush_every_n": 7} if backend == "hybrid" else {}))
    rng = random.Random(worker)
    # Each worker saves its own increasing, interleaved subsequence of 22-digit numbers.
    values = sorted(rng.sample(range(10**21, 10**21 + 100_000), SAVES_PER_WORKER))
    barrier.wait()
    outcomes = []
    for v in values:
        r = store.save(key, str(v), context=SaveContext(writer=f"w{worker}"))
        outcomes.append((str(v), r.outcome.value, r.previous))
    store.close()
    out.put((worker, max(values), outcomes))


@pytest.mark.parametrize("backend", ["redis", "postgres", "hybrid"])
def test_racing_writers_end_at_the_maximum_and_history_never_decreases(
    backend: str, redis_url: str, postgres_url: str
) -> None:
    key = unique_key()
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(WORKERS)
    out: mp.Queue = ctx.Queue()
    procs = [
        ctx.Process(target=_race, args=(backend, redis_url, postgres_url, key.sort_tuple[:4] + (key.shard,), i,
                                        barrier, out))
        for i in range(WORKERS)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    expected_max = str(max(m for _, m, _ in results))

    store = build_store(backend, redis_url, postgres_url)
    assert store.load(key) == expected_max
    if backend == "hybrid":
        assert store.postgres.load(key) == expected_max  # close() flushed every writer's buffer
    # Every accepted save moved strictly forward from what it replaced.
    for _, _, outcomes in results:
        for value, outcome, previous in outcomes:
            if outcome == "advanced" and previous is not None:
                assert sort_key(previous) < sort_key(value)
            if outcome == "stale":
                assert sort_key(previous) > sort_key(value)
    # History, in write order, is strictly increasing and ends at the maximum.
    history = [h.sequence for h in reversed(store.history(key, limit=10_000))]
    assert history and history[-1] == expected_max
    assert all(sort_key(a) < sort_key(b) for a, b in zip(history, history[1:]))  # noqa: B905
    if backend != "redis":
        pg = store.postgres if backend == "hybrid" else store
        pg_hist = [h.sequence for h in reversed(pg.history(key, limit=10_000))]
        assert all(sort_key(a) < sort_key(b) for a, b in zip(pg_hist, pg_hist[1:]))  # noqa: B905
    store.close()
