"""Benchmark: the scheduled Redis -> Postgres checkpoint mirror vs the raw client path.

For each key count (default 10,000 and 100,000) on a fresh database and Redis db:

* raw: ``SCAN checkpoint:*`` + pipelined ``MGET`` + one batched ``INSERT ... ON CONFLICT DO UPDATE``
  per batch into a table of the same layout, with the plain clients (no guard, no history);
* mirror: ``CheckpointMirror.run()`` (monotonic guard, history rows, restore pass, cursor pass).

Two rounds each: ``cold`` (Postgres empty: every key inserted) and ``warm`` (every Redis value
advanced since the last mirror: every row updated). Prints one JSON document.

    .venv/bin/python benchmarks/mirror.py [--keys 10000,100000] [--batch 5000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import sys
import time
from pathlib import Path

import psycopg
import redis
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from durability_pipelines import services  # noqa: E402
from durability_pipelines.checkpoints.keys import CheckpointKey  # noqa: E402
from durability_pipelines.checkpoints.mirror import CheckpointMirror  # noqa: E402
from durability_pipelines.checkpoints.postgres_store import PostgresConnection  # noqa: E402
from durability_pipelines.consumer.storage import ensure  # noqa: E402

RAW_UPSERT = """
INSERT INTO checkpoints_raw (adapter, stream, grp, consumer, shard, sequence, ts)
SELECT a, s, g, c, sh, seq, NOW() FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[])
  AS k(a, s, g, c, sh, seq)
ON CONFLICT (adapter, stream, grp, consumer, shard) DO UPDATE SET sequence = EXCLUDED.sequence, ts = NOW()
"""


def fill(client: redis.Redis, n: int, base: int) -> None:
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        pipe.set(CheckpointKey("dynamodb", "bench", "g", "c", f"shard-{i:07d}").redis_key, str(base + i))
        if i % 10_000 == 9_999:
            pipe.execute()
    pipe.execute()


def raw_path(client: redis.Redis, conn: psycopg.Connection, batch: int) -> float:
    start = time.perf_counter()
    keys: list[bytes] = []

    def flush(keys: list[bytes]) -> None:
        pipe = client.pipeline(transaction=False)
        for i in range(0, len(keys), 1000):
            pipe.mget(keys[i : i + 1000])
        values = [v for chunk in pipe.execute() for v in chunk]
        rows = []
        for k, v in zip(keys, values, strict=True):
            parts = k.decode().split(":")
            rows.append((*parts[1:6], v.decode()))
        cols = [list(c) for c in zip(*rows, strict=True)]
        conn.execute(RAW_UPSERT, cols)

    for k in client.scan_iter(match="checkpoint:*", count=1000):
        keys.append(k)
        if len(keys) >= batch:
            flush(keys)
            keys = []
    if keys:
        flush(keys)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", default="10000,100000")
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--redis-db", type=int, default=15)
    args = ap.parse_args(argv)
    admin = services.resolve_postgres_url()
    redis_url = services.with_redis_db(services.resolve_redis_url(), args.redis_db)
    client = redis.Redis.from_url(redis_url)
    results = []
    for n in (int(x) for x in args.keys.split(",")):
        name = f"bench_mirror_{secrets.token_hex(4)}"
        url = services.ensure_database(admin, name)
        try:
            client.flushdb()
            db = PostgresConnection(url)
            ensure(db)
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("CREATE TABLE checkpoints_raw (LIKE checkpoints INCLUDING ALL)")
                fill(client, n, 10**21)
                row = {"keys": n}
                row["raw_cold_s"] = raw_path(client, conn, args.batch)
                row["mirror_cold_s"] = CheckpointMirror(client, db, batch_size=args.batch).run().duration_s
                fill(client, n, 10**21 + 10**6)  # every key advanced since the last mirror
                row["raw_warm_s"] = raw_path(client, conn, args.batch)
                report = CheckpointMirror(client, db, batch_size=args.batch).run()
                row["mirror_warm_s"] = report.duration_s
                row["mirror_warm_keys_mirrored"] = report.mirrored_to_postgres
                row["mirror_idle_s"] = CheckpointMirror(client, db, batch_size=args.batch).run().duration_s
                fill(client, n, 10**21 + 2 * 10**6)  # advance again: the same warm round without history rows
                row["raw_warm_nohist_s"] = raw_path(client, conn, args.batch)
                row["mirror_warm_nohist_s"] = CheckpointMirror(
                    client, db, batch_size=args.batch, record_history=False).run().duration_s
            for phase in ("cold", "warm", "warm_nohist"):
                row[f"ratio_{phase}"] = round(row[f"mirror_{phase}_s"] / row[f"raw_{phase}_s"], 3)
                row[f"mirror_{phase}_us_per_key"] = round(row[f"mirror_{phase}_s"] / n * 1e6, 2)
            row = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
            results.append(row)
            db.close()
        finally:
            with psycopg.connect(services.libpq_url(admin), autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    client.flushdb()
    linear = None
    if len(results) >= 2:
        a, b = results[0], results[-1]
        linear = round((b["mirror_warm_s"] / b["keys"]) / (a["mirror_warm_s"] / a["keys"]), 3)
    print(json.dumps({
        "benchmark": "checkpoint_mirror",
        "target": "mirror <= 1.5x raw SCAN+MGET+batched upsert; linear in keys",
        "results": results,
        "per_key_cost_ratio_largest_vs_smallest": linear,
        "targets_met_with_history": all(r["ratio_warm"] <= 1.5 and r["ratio_cold"] <= 1.5 for r in results),
        "targets_met_without_history": all(r["ratio_warm_nohist"] <= 1.5 for r in results),
        "env": {"python": platform.python_version(), "cpus": os.cpu_count(),
                "redis": client.info("server").get("redis_version"),
                "postgres_url": services.mask_url(admin)},
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
