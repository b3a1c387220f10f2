"""The demo's producer survives an outage of Postgres (a real, private server stopped and restarted) and
of DynamoDB: every write lands exactly once, so the demo can show that an outage loses nothing."""

from __future__ import annotations

import time

import psycopg

from durability_pipelines.demo import TABLE, Producer
from tests.support.dagster_daemon import wait_until
from tests.support.dynamodb import clients, create_stream_table, moto_server


def stream_records(ddb, streams) -> list[tuple[str, str]]:
    arn = ddb.describe_table(TableName=TABLE)["Table"]["LatestStreamArn"]
    (shard,) = streams.describe_stream(StreamArn=arn)["StreamDescription"]["Shards"]
    it = streams.get_shard_iterator(StreamArn=arn, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON")
    out = []
    resp = streams.get_records(ShardIterator=it["ShardIterator"], Limit=1000)
    for r in resp["Records"]:
        out.append((r["eventName"], r["dynamodb"]["Keys"]["pk"]["S"]))
    return out


def test_the_producer_rides_out_a_postgres_outage_and_writes_each_change_once(private_postgres) -> None:
    with psycopg.connect(private_postgres.url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE public.{TABLE} (id BIGINT PRIMARY KEY, status TEXT, total INT)")
    with moto_server() as endpoint:
        ddb, streams = clients(endpoint)
        create_stream_table(ddb, TABLE)
        producer = Producer(endpoint, private_postgres.url, events=60, rate=20)
        producer.start()
        wait_until(lambda: producer.produced >= 15, what="the first writes", timeout=60)
        private_postgres.stop()  # the demo's Postgres goes away mid-stream ...
        time.sleep(2)
        private_postgres.start()  # ... and comes back
        producer.join(timeout=120)
        assert not producer.is_alive() and producer.error is None
        assert producer.produced == 60 and producer.outages >= 1
        with psycopg.connect(private_postgres.url) as conn:
            (n, distinct) = conn.execute(f"SELECT count(*), count(DISTINCT id) FROM public.{TABLE}").fetchone()
        assert n == distinct == 60
        records = stream_records(ddb, streams)
        assert len(records) == 60 and {e for e, _ in records} == {"INSERT"}  # no MODIFY from a retried put
