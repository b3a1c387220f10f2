"""The baseline of benchmarks/drain.py: the simplest hand-written consumer doing the pipeline's work.

GetRecords (Limit 1000) -> the default sink's idempotent INSERT into ``stream_events`` (one statement
per batch, committed) -> Redis ``SET <checkpoint key> <last sequence>`` per batch. No lease, no
history, no retries, no Dagster: what a careful person would write in an afternoon.

    python benchmarks/hand_consumer.py --endpoint URL --table T --postgres-url URL --redis-url URL \
        --key checkpoint:... [--follow-until EPOCH_S]

Without ``--follow-until`` it stops at the first empty page (drained); with it, it polls every
0.25 s (Lambda polls a shard 4 times a second) until that time and then until caught up.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("--endpoint", "--table", "--postgres-url", "--redis-url", "--key"):
        ap.add_argument(name, required=True)
    ap.add_argument("--consumer", default="hand-loop")
    ap.add_argument("--follow-until", type=float, default=None)
    args = ap.parse_args(argv)

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
            cols: list[list] = [[] for _ in range(11)]
            for r in records:
                d = r["dynamodb"]
                row = (args.table, shard_id, d["SequenceNumber"], "dynamodb", r["eventName"], _plain(d.get("Keys")),
                       _plain(d.get("NewImage")), _plain(d.get("OldImage")), d.get("ApproximateCreationDateTime"),
                       r.get("eventID"), args.consumer)
                for col, value in zip(cols, row, strict=True):
                    col.append(value)
            conn.execute(INSERT_SQL, cols)
            conn.commit()
            rds.set(args.key, records[-1]["dynamodb"]["SequenceNumber"])
            events += len(records)
        it = resp.get("NextShardIterator") or it
        if not records:
            if args.follow_until is None or time.time() >= args.follow_until:
                break
            time.sleep(0.25)
    print(json.dumps({"events": events}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
