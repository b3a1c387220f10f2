"""The WAL change feed against the trigger feed and a hand-written slot reader (issue 23).

Two phases, each printing its figures into one JSON document (stdout):

* **write overhead**: the same workload (``--changes`` row changes, one statement each: inserts, then
  updates of the same rows, in transactions of 100) written by one session into three tables of a private ``wal_level = logical``
  server: a plain table (no feed), a table with the trigger feed installed (``durability_change_log``), and a
  table in a publication with a logical slot (the WAL feed). Each round writes every variant once, in a
  rotated order (the machine is noisy); each variant's table, feed, publication and slot are made afresh
  for each round. Reported: the writer's seconds per variant (median of the rounds) and each feed ÷ plain.
  The plain table is on the same ``wal_level = logical`` server: what the server-wide setting costs every
  table is not the feed's (it is the price of having logical decoding at all; Supabase runs with it).
* **drain** (unless ``--skip-drain``): a backlog of ``--drain-changes`` changes in the watched table, drained
  (a) through the real ``dagster-daemon`` by a copy of the ``supabase_orders_worker`` starter switched to
  ``source.kind: supabase_wal`` (everything else as shipped: hybrid checkpoints, the ``stream_events`` sink,
  ``max_events`` 1000), and (b) by the hand loop: peek 1,000 changes (``pg_logical_slot_peek_binary_changes``,
  the same ``pgoutput`` decoder), the same idempotent ``INSERT`` into ``stream_events`` (a database of its
  own), commit, Redis ``SET``, ``pg_replication_slot_advance``. Each round gives both a slot of their own
  created before the backlog is written, and alternates which goes first. The daemon's clock runs from its
  sensor's start until the consumer's Redis checkpoint is the backlog's last position.

Targets (issue 23), in the JSON as ``met``, never asserted: the WAL feed adds ≤ 5 % to the writers' time;
the daemon drains ≤ 1.2 × the hand loop's time.

    .venv/bin/python benchmarks/change_feed.py [--changes 50000] [--rounds 5] [--drain-changes 50000]
        [--drain-rounds 2] [--skip-drain] [--no-mirror] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
import redis
import yaml
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BATCH_LINE, BIN, _ping, _redis_binary, _wait, load, say, set_label  # noqa: E402

from durability_pipelines import services  # noqa: E402
from durability_pipelines.checkpoints.postgres_store import PostgresConnection  # noqa: E402
from durability_pipelines.consumer.config import write_consumer_instance  # noqa: E402
from durability_pipelines.consumer.storage import ensure  # noqa: E402
from durability_pipelines.processes import ProcessGroup, temporary_env  # noqa: E402
from durability_pipelines.sinks.postgres_events import INSERT_SQL  # noqa: E402
from durability_pipelines.sources.pgoutput import PgOutputDecoder  # noqa: E402
from durability_pipelines.sources.supabase_changes import install_change_feed  # noqa: E402
from durability_pipelines.sources.wal_changes import (  # noqa: E402
    drop_wal_source,
    encode_position,
    install_wal_source,
)
from tests.support.servers import PrivatePostgres  # noqa: E402

STARTER = ROOT / "durability_pipelines" / "defs" / "consumers" / "supabase_orders_worker" / "defs.yaml"
TXN = 100  # rows per writer transaction
VARIANTS = ("plain", "trigger", "wal")
WAL_TARGET = 1.05
DRAIN_TARGET = 1.2


# -- write overhead ---------------------------------------------------------------------------------
def _workload(conn: psycopg.Connection, table: str, changes: int) -> float:
    """``changes`` row changes as an application makes them, one statement per row (half inserts, then
    updates of the same rows), in transactions of TXN rows; psycopg pipelines each transaction's statements."""
    rows = changes // 2
    insert = sql.SQL("INSERT INTO {} VALUES (%s, 'new', now())").format(sql.Identifier(table))
    update = sql.SQL("UPDATE {} SET v = 'changed', at = now() WHERE id = %s").format(sql.Identifier(table))
    t0 = time.perf_counter()
    with conn.cursor() as cur:
        for statement in (insert, update):
            for start in range(0, rows, TXN):
                cur.executemany(statement, [(i,) for i in range(start, min(rows, start + TXN))])
                conn.commit()
    return time.perf_counter() - t0


def _prepare(admin: psycopg.Connection, variant: str, table: str) -> None:
    admin.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(sql.Identifier(table)))
    admin.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, v text, at timestamptz)").format(sql.Identifier(table)))
    if variant == "trigger":
        admin.execute("DROP TABLE IF EXISTS durability_change_log CASCADE")
        install_change_feed(admin, f"public.{table}")
    elif variant == "wal":
        drop_wal_source(admin, slot=f"{table}_slot", publication=f"{table}_pub")
        install_wal_source(admin, publication=f"{table}_pub", slot=f"{table}_slot", tables=[f"public.{table}"])


def write_overhead_phase(pg: PrivatePostgres, args: argparse.Namespace) -> dict[str, Any]:
    per: dict[str, list[float]] = {v: [] for v in VARIANTS}
    rounds = []
    with pg.connect() as admin, pg.connect(autocommit=False) as writer:
        for r in range(args.rounds):
            order = VARIANTS[r % 3:] + VARIANTS[:r % 3]
            for variant in order:
                table = f"wo_{variant}"
                _prepare(admin, variant, table)
                admin.execute("CHECKPOINT")  # each variant starts from a clean WAL position
                seconds = _workload(writer, table, args.changes)
                per[variant].append(seconds)
                rounds.append({"round": r + 1, "variant": variant, "seconds": round(seconds, 3), "load": load()})
                say(f"write overhead round {r + 1}: {variant} {seconds:.2f} s")
            drop_wal_source(admin, slot="wo_wal_slot", publication="wo_wal_pub")
    median = {v: statistics.median(s) for v, s in per.items()}
    ratios = {v: round(median[v] / median["plain"], 3) for v in ("trigger", "wal")}
    return {"changes": args.changes, "rounds": rounds,
            "median_seconds": {v: round(s, 3) for v, s in median.items()},
            "ratio_to_plain": ratios,
            "target": {"wal_ratio_max": WAL_TARGET, "met": ratios["wal"] <= WAL_TARGET}}


# -- drain ---------------------------------------------------------------------------------------------
def _write_backlog(pg: PrivatePostgres, table: str, changes: int, start: int) -> None:
    """Inserts of new rows in transactions of TXN (ids from ``start``)."""
    with pg.connect(autocommit=False) as conn:
        for s in range(start, start + changes, TXN):
            conn.execute(sql.SQL("INSERT INTO {} SELECT g, 'new', now() FROM generate_series(%s::int, %s::int) g").format(
                sql.Identifier(table)), (s, min(start + changes, s + TXN) - 1))
            conn.commit()


def hand_drain(pg: PrivatePostgres, slot: str, publication: str, channel: str, sink_url: str, rds: redis.Redis,
               key: str) -> dict[str, Any]:
    """The hand loop: peek 1,000 -> INSERT -> commit -> SET -> advance the slot, until the slot is empty."""
    decoder = PgOutputDecoder()
    events, last = 0, None
    t0 = time.monotonic()
    with pg.connect() as source, psycopg.connect(sink_url) as sink:
        while True:
            messages = source.execute(
                "SELECT lsn, data FROM pg_logical_slot_peek_binary_changes(%s, NULL, 1000, 'proto_version', '1', "
                "'publication_names', %s)", (slot, publication)).fetchall()
            decoder._txn = None  # a peek starts at a transaction's beginning
            rows, end_lsn = [], None
            for lsn, data in messages:
                txn = decoder.feed(bytes(data))
                if txn is None:
                    continue
                end_lsn = lsn
                for i, c in enumerate(txn.changes, start=1):
                    rows.append((channel, "", str(encode_position(txn.final_lsn, i)), "supabase", c.operation,
                                 json.dumps(c.keys, default=str), json.dumps(c.new, default=str),
                                 json.dumps(c.old, default=str) if c.old is not None else None, txn.commit_time,
                                 str(encode_position(txn.final_lsn, i)), "hand-loop"))
            if not rows:
                break
            sink.execute(INSERT_SQL, [list(col) for col in zip(*rows, strict=True)])
            sink.commit()
            last = rows[-1][2]
            rds.set(key, last)
            source.execute("SELECT pg_replication_slot_advance(%s, %s::pg_lsn)", (slot, end_lsn))
            events += len(rows)
    return {"variant": "hand_loop", "seconds": round(time.monotonic() - t0, 3), "events": events, "last": last}


def timed_hand(*hand_args: Any) -> dict[str, Any]:
    before = load()
    out = hand_drain(*hand_args)
    return {**out, "load_before": before, "load_after": load()}


def timed_daemon(pg: PrivatePostgres, slot: str, publication: str, instance: Any, sensor: Any, name: str,
                 rds: redis.Redis, key: str, *, last: str | None) -> dict[str, Any]:
    """Start the consumer's sensor; the clock stops when its Redis checkpoint is the backlog's last position."""
    from dagster import RunsFilter

    if last is None:  # the hand loop has not run yet: the last position is the slot's end
        last = _last_position(pg, slot, publication)
    before = load()
    sensor("start", f"{name}_sensor")
    t0, wall0 = time.monotonic(), time.time()
    _wait(lambda: (v := rds.get(key)) is not None and v.decode() == last, f"{name} to drain", 3600, every=0.05)
    seconds = time.monotonic() - t0
    after = load()
    runs = _wait(lambda: (r := list(instance.get_run_records(filters=RunsFilter(job_name=f"{name}_job"))))
                 and all(x.dagster_run.is_finished for x in r) and r, f"{name}'s runs to end", 300, 0.5)
    sensor("stop", f"{name}_sensor")
    reads = sorted(b for r in runs for b in _batch_times(instance, r.dagster_run.run_id))
    return {"variant": "daemon", "seconds": round(seconds, 3), "runs": len(runs),
            "runs_succeeded": sum(r.dagster_run.status.value == "SUCCESS" for r in runs),
            # where the time went: the run boundary (tick, launch, process start, first read) and the drain in it
            "to_first_batch_s": round(reads[0][0] - wall0, 3) if reads else None,
            "in_run_drain_s": round(reads[-1][1] - reads[0][0], 3) if reads else None,
            "batches": len(reads), "load_before": before, "load_after": after, "last": last}


def _batch_times(instance: Any, run_id: str) -> list[tuple[float, float]]:
    """(read at, logged at) of each batch the run logged (its batch line carries the process+ack duration)."""
    out = []
    for entry in instance.all_logs(run_id):
        if entry.dagster_event is None and (m := BATCH_LINE.match(entry.user_message or "")):
            out.append((entry.timestamp - float(m.group(3)), entry.timestamp))
    return out


def consumer_yaml(name: str, channel: str, table: str, group: str) -> dict[str, Any]:
    cfg = yaml.safe_load(STARTER.read_text())["attributes"]
    cfg.update(name=name, group=group, sensor_running_by_default=False,
               description=f"benchmark copy of the supabase_orders_worker starter on the WAL feed ({table})")
    cfg["source"] = {"kind": "supabase_wal", "channel": channel, "tables": [f"public.{table}"],
                     "replay_from": "earliest", "install": False}
    return cfg


def drain_phase(pg: PrivatePostgres, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    run = secrets.token_hex(3)
    admin_url = services.resolve_postgres_url()
    dbs = {k: f"bench_feed_{k}_{run}" for k in ("sink", "hand", "dagster")}
    urls = {k: services.ensure_database(admin_url, name) for k, name in dbs.items()}
    for k in ("sink", "hand"):
        db = PostgresConnection(urls[k])
        ensure(db)
        db.close()
    channel, table = f"feed-{run}", f"feed_{run}"
    groups = [f"r{i + 1}" for i in range(args.drain_rounds)]
    consumers = {g: f"wal_bench_{g}" for g in groups}
    with pg.connect() as admin:
        admin.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, v text, at timestamptz)").format(
            sql.Identifier(table)))
    publication = f"durability_{channel}".replace("-", "_")
    procs: list[ProcessGroup] = []
    instance = None
    results: list[dict[str, Any]] = []
    try:
        redis_port = services.free_port()
        procs.append(ProcessGroup("redis", [_redis_binary(), "--port", str(redis_port), "--bind", "127.0.0.1",
                                            "--save", "", "--appendonly", "no", "--dir", str(tmp)],
                                  dict(os.environ), tmp / "redis.log").start())
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        rds = redis.Redis.from_url(redis_url)
        _wait(lambda: _ping(rds), "the private Redis", 30)
        consumers_dir = tmp / "consumers"
        consumers_dir.mkdir()
        for g, name in consumers.items():
            write_consumer_instance(consumers_dir, consumer_yaml(name, channel, table, g))
        home = tmp / "dagster_home"
        home.mkdir()
        shutil.copyfile(ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
        dagster_url = services.dagster_storage_url(urls["dagster"])
        env = {"DURABILITY_POSTGRES_URL": urls["sink"], "DURABILITY_REDIS_URL": redis_url,
               "DURABILITY_SUPABASE_DB_URL": pg.url, "DURABILITY_CONSUMERS_DIR": str(consumers_dir),
               "DAGSTER_POSTGRES_URL": dagster_url, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
        if args.no_mirror:
            env["DURABILITY_MIRROR_CRON"] = "0 0 1 1 *"
        from dagster import DagsterInstance

        with temporary_env(DAGSTER_HOME=str(home), DAGSTER_POSTGRES_URL=dagster_url):
            instance = DagsterInstance.get()
        procs.append(ProcessGroup("dagster-daemon", [str(BIN / "dagster-daemon"), "run", "-w",
                                                     str(ROOT / "workspace.yaml")],
                                  {**os.environ, **env, "DAGSTER_HOME": str(home)}, tmp / "daemon.log",
                                  cwd=ROOT).start())

        def sensor(verb: str, name: str) -> None:
            out = subprocess.run([str(BIN / "dagster"), "sensor", verb, "-w", str(ROOT / "workspace.yaml"), name],
                                 cwd=ROOT, env={**os.environ, **env, "DAGSTER_HOME": str(home)},
                                 capture_output=True, text=True, timeout=180)
            if out.returncode != 0 and verb == "start":
                raise RuntimeError(f"dagster sensor start {name} failed: {out.stdout[-2000:]}{out.stderr[-2000:]}")

        for i, g in enumerate(groups):
            hand_slot, daemon_slot = f"bench_hand_{run}_{g}", f"durability_{channel}_{g}".replace("-", "_")
            with pg.connect() as admin:
                install_wal_source(admin, publication=publication, slot=hand_slot, tables=[f"public.{table}"])
                install_wal_source(admin, publication=publication, slot=daemon_slot, tables=[f"public.{table}"])
            _write_backlog(pg, table, args.drain_changes, start=i * args.drain_changes)
            say(f"drain round {i + 1}: {args.drain_changes} changes written")
            hand_args = (pg, hand_slot, publication, channel, urls["hand"], rds, f"bench:hand:{channel}:{g}")
            daemon_args = (pg, daemon_slot, publication, instance, sensor, consumers[g], rds,
                           f"checkpoint:supabase:{channel}:{g}:consumer-a")
            if i % 2 == 0:
                hand = timed_hand(*hand_args)
                daemon = timed_daemon(*daemon_args, last=hand["last"])
            else:
                daemon = timed_daemon(*daemon_args, last=None)
                hand = timed_hand(*hand_args)
            pair = [{**hand, "round": i + 1}, {**daemon, "round": i + 1}]
            results += pair if i % 2 == 0 else pair[::-1]  # in the order they ran
            say(f"drain round {i + 1}: hand loop {hand['seconds']:.1f} s, daemon {daemon['seconds']:.1f} s")
            with pg.connect() as admin:
                for slot in (hand_slot, daemon_slot):
                    admin.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                                  "WHERE slot_name = %s", (slot,))
        sink_rows = {"daemon": _rows(urls["sink"], channel), "hand_loop": _rows(urls["hand"], channel)}
    finally:
        for proc in reversed(procs):
            proc.stop(grace_s=10)
        if instance is not None:
            instance.dispose()
        with psycopg.connect(services.libpq_url(admin_url), autocommit=True) as conn:
            for name in dbs.values():
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    hand_s = statistics.median(r["seconds"] for r in results if r["variant"] == "hand_loop")
    daemon_s = statistics.median(r["seconds"] for r in results if r["variant"] == "daemon")
    ratio = round(daemon_s / hand_s, 3)
    return {"changes": args.drain_changes, "rounds": results,
            "median_seconds": {"hand_loop": round(hand_s, 3), "daemon": round(daemon_s, 3)},
            "daemon_over_hand": ratio, "sink_rows": sink_rows,
            "exact_sink": set(sink_rows.values()) == {args.drain_changes * args.drain_rounds},
            "events_per_s": {"hand_loop": round(args.drain_changes / hand_s, 1),
                             "daemon": round(args.drain_changes / daemon_s, 1)},
            "target": {"ratio_max": DRAIN_TARGET, "met": ratio <= DRAIN_TARGET}}


def _rows(url: str, channel: str) -> int:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT count(*) FROM stream_events WHERE stream = %s", (channel,)).fetchone()[0]


def _last_position(pg: PrivatePostgres, slot: str, publication: str) -> str:
    """The position of the last change the slot holds (a peek of everything; nothing is consumed)."""
    decoder = PgOutputDecoder()
    last = None
    with pg.connect() as conn:
        for (data,) in conn.execute("SELECT data FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, "
                                    "'proto_version', '1', 'publication_names', %s)", (slot, publication)):
            txn = decoder.feed(bytes(data))
            if txn is not None and txn.changes:
                last = str(encode_position(txn.final_lsn, len(txn.changes)))
    if last is None:
        raise RuntimeError(f"slot {slot} holds no change")
    return last


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--changes", type=int, default=50_000, help="row changes of the write-overhead workload")
    ap.add_argument("--rounds", type=int, default=5, help="write-overhead rounds (each writes every variant)")
    ap.add_argument("--drain-changes", type=int, default=50_000, help="backlog drained per drain round")
    ap.add_argument("--drain-rounds", type=int, default=2, help="drain rounds (hand loop and daemon each)")
    ap.add_argument("--skip-drain", action="store_true", help="measure the write overhead only")
    ap.add_argument("--no-mirror", action="store_true", help="switch the every-minute mirror schedule off")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = ap.parse_args(argv)
    set_label("change_feed")
    started = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="dp-feed-bench-"))
    pg = PrivatePostgres(settings={"wal_level": "logical", "max_replication_slots": "20", "max_wal_senders": "20"})
    pg.start()
    try:
        report: dict[str, Any] = {"benchmark": "change_feed", "write_overhead": write_overhead_phase(pg, args)}
        if not args.skip_drain:
            report["drain"] = drain_phase(pg, args, tmp)
    finally:
        pg.close()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    report["targets"] = {"wal_write_overhead": report["write_overhead"]["target"],
                         "drain": report["drain"]["target"] if "drain" in report else None}
    report["environment"] = {"cpus": os.cpu_count(), "load_avg_end": load(),
                             "wall_seconds": round(time.time() - started, 1), "mirror_schedule": not args.no_mirror,
                             "starter": str(STARTER.relative_to(ROOT)), "postgres": "private, wal_level=logical"}
    print(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
