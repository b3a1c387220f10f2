"""Store outages in the middle of a drain, on private servers the test owns: Redis killed, Redis flushed,
Postgres stopped and restarted. A run that cannot go on fails cleanly; the next run resumes after the last
acked batch. The KCL oracle on the sink, and no regression in the history."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from durability_pipelines.audit.tables import build_history_summary
from durability_pipelines.checkpoints.keys import CheckpointKey
from durability_pipelines.checkpoints.postgres_store import PostgresConnection
from durability_pipelines.consumer.storage import ensure
from tests.support.dagster_daemon import DELIVERIES_DDL, wait_until
from tests.support.dynamodb import AWS_TEST_ENV, clients, create_stream_table, moto_server, put_items

ROOT = Path(__file__).resolve().parents[2]
EVENTS = 400


def run_worker(args: dict, env: dict) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "tests.support.drain_worker", json.dumps(args)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def acked(postgres_url: str, redis_client, key: CheckpointKey) -> int:
    values = []
    try:
        raw = redis_client.get(key.redis_key)
        if raw and raw.isdigit():
            values.append(int(raw))
    except Exception:  # noqa: BLE001 - Redis may be the store that is down
        pass
    try:
        with psycopg.connect(postgres_url, connect_timeout=2) as conn:
            row = conn.execute("SELECT sequence FROM checkpoints WHERE consumer = 'worker' AND grp = %s",
                               (key.group,)).fetchone()
        if row and row[0].isdigit():
            values.append(int(row[0]))
    except psycopg.OperationalError:
        pass
    return max(values, default=0)


@pytest.mark.parametrize("fault", ["redis-killed", "redis-flushed", "postgres-restarted"])
def test_an_outage_mid_drain_loses_nothing(fault: str, make_private_redis, private_postgres) -> None:
    rd = make_private_redis(appendonly=False)
    pg_url = private_postgres.url
    ensure(PostgresConnection(pg_url))
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(DELIVERIES_DDL)
    with moto_server() as endpoint:
        ddb, streams = clients(endpoint)
        table, _ = create_stream_table(ddb)
        put_items(ddb, table, [{"pk": f"k{i:04d}", "n": i} for i in range(EVENTS)])
        env = {**os.environ, **AWS_TEST_ENV, "DURABILITY_DYNAMODB_ENDPOINT_URL": endpoint, "PYTHONPATH": str(ROOT)}
        args = {"table": table, "group": "g-outage", "postgres_url": pg_url, "redis_url": rd.url,
                "flag": "unused", "slow_s": 0.4}
        arn = ddb.describe_table(TableName=table)["Table"]["LatestStreamArn"]
        (shard,) = streams.describe_stream(StreamArn=arn)["StreamDescription"]["Shards"]
        key = CheckpointKey("dynamodb", table, "g-outage", "worker", shard["ShardId"])
        client = rd.client()
        first = run_worker({**args, "run_id": "run-1"}, env)
        start = int(shard["SequenceNumberRange"]["StartingSequenceNumber"])
        wait_until(lambda: acked(pg_url, client, key) >= start + 100, what="two batches acked", timeout=120)
        if fault == "redis-killed":
            rd.kill()  # the hybrid store goes on against Postgres alone
        elif fault == "redis-flushed":
            client.flushall()  # checkpoints, leases, history: gone from Redis
        else:
            private_postgres.stop()
            time.sleep(1.5)
            private_postgres.start()
        first.communicate(timeout=300)
        if fault == "redis-killed":
            rd.start()
        runs = 1
        while acked(pg_url, rd.client(), key) < start + EVENTS - 1 and runs < 4:  # a failed run is re-dispatched
            runs += 1
            follow = run_worker({**args, "run_id": f"run-{runs}", "dead": [f"run-{n}" for n in range(1, runs)]}, env)
            follow.communicate(timeout=300)
        with psycopg.connect(pg_url) as conn:
            sink = [s for (s,) in conn.execute(
                "SELECT sequence FROM stream_events WHERE stream = %s ORDER BY sequence::numeric", (table,))]
        it = streams.get_shard_iterator(StreamArn=arn, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON")
        produced = [r["dynamodb"]["SequenceNumber"] for r in
                    streams.get_records(ShardIterator=it["ShardIterator"], Limit=1000)["Records"]]
        assert sink == produced  # every record once, in order, nothing skipped
        summary = build_history_summary(PostgresConnection(pg_url))
        assert int(summary["regressions"].sum()) == 0
        assert acked(pg_url, rd.client(), key) == int(produced[-1])
