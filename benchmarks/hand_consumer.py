"""The baseline of the daemon benchmarks: the simplest hand-written consumer doing the pipeline's work.

GetRecords (Limit 1000) -> the default sink's idempotent INSERT into ``stream_events`` (one statement
per batch, committed) -> Redis ``SET <checkpoint key> <last sequence>`` per batch. No lease, no
history, no retries, no Dagster: what a careful person would write in an afternoon.

    python benchmarks/hand_consumer.py --endpoint URL --table T --postgres-url URL --redis-url URL \
        --key checkpoint:... [--follow-until EPOCH_S] [--kinesis-stream NAME]

Without ``--follow-until`` it stops at the first empty page (drained); with it, it polls every
0.25 s (Lambda polls a shard 4 times a second) until that time and then until caught up.

``--kinesis-stream`` (benchmarks/shards.py): the table's Kinesis destination instead of its DynamoDB
stream, every shard of it at once, **one thread per shard** (each its own Postgres connection, one Redis
client shared: redis-py's pool is thread-safe), the checkpoint of shard S at ``<key>:S``. The record's
data is the change in the destination's JSON format. Stdout: ``{"events", "shards", "cpu_s", "max_rss_mb"}``
(this process's own CPU and peak RSS, so the benchmark compares it with the Dagster process tree).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import threading
import time
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import boto3
import psycopg
import redis
from boto3.dynamodb.types import TypeDeserializer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from durability_pipelines.sinks.postgres_events import INSERT_SQL  # noqa: E402 - the same INSERT

_des = TypeDeserializer()


def _plain(image: dict | None) -> str | None:
    if image is None:
        return None
    value = {k: _des.deserialize(v) for k, v in image.items()}
    return json.dumps(value, default=lambda o: int(o) if isinstance(o, Decimal) and o == o.to_integral_value()
                      else str(o))


def _write_batch(conn: psycopg.Connection, rds: redis.Redis, key: str, rows: list[tuple]) -> None:
    """One batch: the INSERT (a column array per field), committed, then the checkpoint (the last sequence)."""
    conn.execute(INSERT_SQL, [list(col) for col in zip(*rows, strict=True)])
    conn.commit()
    rds.set(key, rows[-1][2])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("--endpoint", "--table", "--postgres-url", "--redis-url", "--key"):
        ap.add_argument(name, required=True)
    ap.add_argument("--consumer", default="hand-loop")
    ap.add_argument("--follow-until", type=float, default=None)
    ap.add_argument("--kinesis-stream", default=None, help="read this Kinesis stream, a thread per shard")
    args = ap.parse_args(argv)
    if args.kinesis_stream:
        return kinesis_main(args)

    kw = {"endpoint_url": args.endpoint, "region_name": "us-east-1"}
    ddb, streams = boto3.client("dynamodb", **kw), boto3.client("dynamodbstreams", **kw)
    arn = ddb.describe_table(TableName=args.table)["Table"]["LatestStreamArn"]
    (shard,) = streams.describe_stream(StreamArn=arn)["StreamDescription"]["Shards"]
    shard_id = shard["ShardId"]
    conn = psycopg.connect(args.postgres_url)
    rds = redis.Redis.from_url(args.redis_url)
    last = rds.get(args.key)
    if last:
        it = streams.get_shard_iterator(StreamArn=arn, ShardId=shard_id, ShardIteratorType="AFTER_SEQUENCE_NUMBER",
                                        SequenceNumber=last.decode())["ShardIterator"]
    else:
        it = streams.get_shard_iterator(StreamArn=arn, ShardId=shard_id, ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
    events = 0
    while True:
        resp = streams.get_records(ShardIterator=it, Limit=1000)
        records = resp["Records"]
        if records:
            _write_batch(conn, rds, args.key, [
                (args.table, shard_id, r["dynamodb"]["SequenceNumber"], "dynamodb", r["eventName"],
                 _plain(r["dynamodb"].get("Keys")), _plain(r["dynamodb"].get("NewImage")),
                 _plain(r["dynamodb"].get("OldImage")), r["dynamodb"].get("ApproximateCreationDateTime"),
                 r.get("eventID"), args.consumer) for r in records])
            events += len(records)
        it = resp.get("NextShardIterator") or it
        if not records:
            if args.follow_until is None or time.time() >= args.follow_until:
                break
            time.sleep(0.25)
    print(json.dumps({"events": events}))
    return 0


def _kinesis_shard(args: argparse.Namespace, kinesis: object, shard_id: str, counts: dict[str, int]) -> None:
    """One shard, start to caught up: the same loop as the DynamoDB one above, the record's data decoded."""
    key = f"{args.key}:{shard_id}"
    conn = psycopg.connect(args.postgres_url)
    rds = redis.Redis.from_url(args.redis_url)
    last = rds.get(key)
    where = ({"ShardIteratorType": "AFTER_SEQUENCE_NUMBER", "StartingSequenceNumber": last.decode()} if last
             else {"ShardIteratorType": "TRIM_HORIZON"})
    it = kinesis.get_shard_iterator(StreamName=args.kinesis_stream, ShardId=shard_id, **where)["ShardIterator"]
    events = 0
    while it:
        resp = kinesis.get_records(ShardIterator=it, Limit=1000)
        records = resp["Records"]
        if records:
            rows = []
            for r in records:
                change = json.loads(r["Data"])
                d = change["dynamodb"]
                created = datetime.fromtimestamp(d["ApproximateCreationDateTime"] / 1000, tz=timezone.utc)
                rows.append((args.table, shard_id, r["SequenceNumber"], "dynamodb", change["eventName"],
                             _plain(d.get("Keys")), _plain(d.get("NewImage")), _plain(d.get("OldImage")), created,
                             change.get("eventID"), args.consumer))
            _write_batch(conn, rds, key, rows)
            events += len(records)
        it = resp.get("NextShardIterator")
        if not records:
            if args.follow_until is None or time.time() >= args.follow_until:
                break
            time.sleep(0.25)
    counts[shard_id] = events
    conn.close()


def kinesis_main(args: argparse.Namespace) -> int:
    kinesis = boto3.client("kinesis", endpoint_url=args.endpoint, region_name="us-east-1")
    shards = [s["ShardId"] for s in kinesis.list_shards(StreamName=args.kinesis_stream)["Shards"]]
    counts: dict[str, int] = {}
    threads = [threading.Thread(target=_kinesis_shard, args=(args, kinesis, s, counts), name=s) for s in shards]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if len(counts) != len(shards):  # a thread died: its traceback is on stderr
        return 1
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"events": sum(counts.values()), "shards": len(shards),
                      "cpu_s": round(usage.ru_utime + usage.ru_stime, 3), "max_rss_mb": round(usage.ru_maxrss / 1024, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
