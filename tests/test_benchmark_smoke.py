"""The checkpoint-store benchmark runs end to end and reports every figure (speed is not asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import redis

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "checkpoint_stores.py"

STORES = ("redis", "postgres", "hybrid", "memory")
BASELINES = ("redis_set", "redis_get", "redis_mget", "redis_evalsha_save_script", "postgres_upsert", "postgres_select")
TARGETS = {
    "redis_save_vs_raw_set": 1.3,
    "postgres_save_vs_raw_upsert": 1.5,
    "hybrid_save_vs_redis_save": 1.2,
    "redis_load_many_vs_raw_mget": 2.0,
}
INFO = ("postgres_load_many_vs_raw_mget", "hybrid_load_many_vs_raw_mget")


def _figure_ok(fig: dict, rounds: int) -> None:
    assert fig["median_us"] > 0 and fig["ops_per_s"] > 0
    assert len(fig["rounds_us"]) == rounds and fig["total_ops"] >= rounds


def test_benchmark_reports_every_store_baseline_and_ratio(redis_url: str, postgres_url: str) -> None:
    rounds = 3
    env = {**os.environ, "DURABILITY_REDIS_URL": redis_url, "DURABILITY_POSTGRES_URL": postgres_url}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--seconds", "0.05", "--keys", "50", "--rounds", str(rounds)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)  # stdout is exactly one JSON document

    assert set(report["stores"]) == set(STORES)
    for name in STORES:
        for op in ("save", "load", "load_many"):
            _figure_ok(report["stores"][name][op], rounds)
        assert report["stores"][name]["load_many"]["keys_per_op"] == 1000
    hybrid = report["stores"]["hybrid"]
    _figure_ok(hybrid["save_steady_state"], rounds)
    assert len(hybrid["flushes"]["rounds"]) == rounds
    _figure_ok(report["extras"]["redis_no_history"]["save"], rounds)
    for name in BASELINES:
        _figure_ok(report["baselines"][name], rounds)
    for name, limit in TARGETS.items():
        ratio = report["ratios"][name]
        assert ratio["ratio"] > 0 and ratio["ratio_of_medians"] > 0
        assert ratio["target_max"] == limit and isinstance(ratio["met"], bool)
        assert report["targets_met"][name] is ratio["met"]
    assert isinstance(report["all_targets_met"], bool)
    for name in INFO:
        assert report["info_ratios"][name]["ratio"] > 0

    env_info = report["environment"]
    assert env_info["python"] and env_info["redis_server"] and env_info["postgres_server"]
    assert report["config"]["rounds"] == rounds and report["config"]["keys"] == 50
    assert all(report["sanity"].values()), report["sanity"]
    for url in (redis_url, postgres_url):  # no credentials leak, whatever the URLs hold
        password = psycopg.conninfo.conninfo_to_dict(url).get("password") if url.startswith("postgres") else (
            redis.connection.parse_url(url).get("password"))
        if password:
            assert password not in proc.stdout and password not in proc.stderr

    # it cleaned up after itself: no benchmark keys left in Redis, its database dropped
    run = report["cleanup"]["postgres"].rsplit("_", 1)[-1]
    client = redis.Redis.from_url(redis_url)
    try:
        assert not list(client.scan_iter(match=f"*{run}*", count=1000))
    finally:
        client.close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (f"bench_{run}",)).fetchone() is None
