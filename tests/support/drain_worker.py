"""A consumer run as its own process, for fault tests that SIGKILL it at a chosen phase.

``python -m tests.support.drain_worker <json args>`` drains one shard of a moto table with the project's
own runtime (hybrid checkpoints, the real DynamoDB reader, the ``record_deliveries`` handler), like a
Dagster run does (or, with ``wal``, the change feed of a ``wal_level = logical`` server through its slot),
and stops at ``pause`` ("launch", "read", "process", "before_ack", "ack", "before_release") of batch
``pause_at``, after writing ``<flag>`` = its pid, until it is killed. The test injects the fault by
killing it there; nothing in the project's code knows about this.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import redis

from durability_pipelines.consumer.config import ConsumerConfig
from durability_pipelines.consumer.drain import DrainBudget, ShardDrainer
from durability_pipelines.consumer.runtime import open_runtime

PAUSE_LIMIT_S = 120.0


def main(args: dict[str, Any]) -> int:
    client = redis.Redis.from_url(args["redis_url"])
    batch_no = 0

    def pause(phase: str) -> None:
        if args.get("pause") == phase and (phase == "launch" or batch_no == args.get("pause_at", 1)):
            client.set(args["flag"], f"{os.getpid()}:{phase}")
            deadline = time.monotonic() + PAUSE_LIMIT_S
            while time.monotonic() < deadline:
                time.sleep(0.05)

    wal = args.get("wal")  # {"channel", "tables", "backend"}: the WAL source of a private wal_level=logical server
    source = ({"kind": "supabase_wal", "channel": wal["channel"], "tables": wal["tables"], "replay_from": "earliest",
               "install": True} if wal else {"kind": "dynamodb", "table": args["table"]})
    checkpoint = {"backend": wal.get("backend", "hybrid"), "flush_every_n": wal.get("flush_every_n", 1),
                  "flush_every_s": 3600} if wal else {
        "backend": "hybrid", "flush_every_n": 2}
    cfg = ConsumerConfig.model_validate({
        "name": "kill_phases", "source": source, "group": args["group"],
        "consumer": "worker", "handler": "tests.support.dagster_daemon:record_deliveries",
        "checkpoint": checkpoint, "max_events": args.get("max_events", 50), "max_idle_s": 0,
        "retry": {"max_retries": 0},
    })
    rt = open_runtime(cfg, redis_url=args["redis_url"], postgres_url=args["postgres_url"],
                      is_owner_dead=lambda owner: owner in args.get("dead", []))
    real_read, real_ack, real_save = rt.source.read, rt.ack, rt.store.save
    real_release = getattr(rt.source, "release", None)
    if real_release is not None:  # a source whose upstream position follows the durable checkpoint (WAL)
        def release(shard, durable, *, final=False):
            pause("before_release")  # the checkpoint saved (durably), the slot not moved yet
            return real_release(shard, durable, final=final)

        rt.source.release = release

    def read(shard, after, max_events):
        nonlocal batch_no
        batch_no += 1
        batch = real_read(shard, after, max_events)
        pause("read")  # records fetched, nothing done with them
        return batch

    def ack(read_out, processed):
        pause("before_ack")  # the handler's transaction committed, the checkpoint not saved
        return real_ack(read_out, processed)

    def save(key, sequence, **kwargs):
        result = real_save(key, sequence, **kwargs)
        pause("ack")  # the checkpoint saved, the run not told yet
        return result

    rt.source.read, rt.ack, rt.store.save = read, ack, save
    handler = rt.handler

    def handle(events, ctx):
        result = handler(events, ctx)
        pause("process")  # the batch's rows written in the open transaction, not committed
        time.sleep(args.get("slow_s", 0))  # a slow handler: room for an outage mid-drain
        return result

    handle.transactional = True  # type: ignore[attr-defined]
    rt.handler = handle
    pause("launch")  # the run process started, nothing taken or read yet
    shard = rt.source.list_shards()[0] if not wal else None
    report = ShardDrainer(rt, shard, args["run_id"], DrainBudget(10_000, 600, args.get("max_idle_s", 0)),
                          prefetch=False).run()
    rt.close()
    print(json.dumps({"events": report.events, "checkpoint": report.checkpoint}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(json.loads(sys.argv[1])))
