"""``migrate``, ``change-feed``, ``wal`` and ``demo``."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any

from durability_pipelines import services
from durability_pipelines.cli.exit_codes import EXIT_OK
from durability_pipelines.cli.secrets import ENV_SUPABASE_DB_URL, FLAG_DB_URL
from durability_pipelines.cli.session import Session, psycopg_url
from durability_pipelines.redis_client import redis_client

if TYPE_CHECKING:
    from durability_pipelines.checkpoints.postgres_store import PostgresConnection


_SCHEMA_TABLES = ("checkpoints", "checkpoint_history", "checkpoint_leases", "checkpoint_sentinels", "durability_schema_version",
                  "dead_letters", "stream_gaps", "sensor_cursors", "stream_events")


def _schema_state(db: PostgresConnection) -> tuple[set[str], dict[str, int]]:
    with db.connection() as conn:
        tables = {r[0] for r in conn.execute(
            "SELECT c.relname FROM pg_class c WHERE c.relkind IN ('r', 'p') AND c.relname = ANY(%s) "
            "AND pg_table_is_visible(c.oid)", (list(_SCHEMA_TABLES),)).fetchall()}
        versions: dict[str, int] = {}
        if "durability_schema_version" in tables:
            versions = dict(conn.execute("SELECT component, version FROM durability_schema_version").fetchall())
    return tables, versions


def cmd_migrate(session: Session, args: argparse.Namespace) -> int:
    from durability_pipelines.consumer import storage as consumer_storage

    db = session.postgres_connection()
    before_tables, before_versions = _schema_state(db)
    consumer_storage.migrate(db)
    after_tables, after_versions = _schema_state(db)
    created = sorted(after_tables - before_tables)
    components = {
        c: {"before": before_versions.get(c), "after": v,
            "action": "created" if before_versions.get(c) is None
            else ("upgraded" if before_versions[c] < v else "up to date")}
        for c, v in sorted(after_versions.items())
    }
    moved: list[Any] = []
    converted, redis_note = _convert_sentinels(session, db, moved)
    data = {"database": services.mask_url(session.postgres_url()), "created_tables": created,
            "existing_tables": sorted(before_tables & after_tables), "components": components,
            "sentinels_converted": [{"store": c.where, "key": c.key, "value": c.value} for c in converted]}
    lines = [f"migrated {data['database']}"]
    lines += [f"  {c}: v{info['after']} ({info['action']})" for c, info in components.items()]
    lines.append("  created tables: " + (", ".join(created) if created else "none (schema was already present)"))
    lines.append(f"  sentinels moved out of shared keys and rows: {len(converted)}")
    lines += [f"    {c.describe()}" for c in converted]
    if moved:  # Redis Cluster only: keys of the single-node layout moved into their checkpoint's slot
        data["cluster_layout"] = [{"from": m.old, "to": m.new, "moved": m.moved, "why": m.why} for m in moved]
        lines.append(f"  keys moved to the Redis Cluster layout: {sum(m.moved for m in moved)}")
        lines += [f"    {m.describe()}" for m in moved]
    if redis_note:
        data["redis"] = redis_note
        lines.append(f"  redis: {redis_note}")
    session.emit(data, "\n".join(lines))
    return EXIT_OK


def _convert_sentinels(session: Session, db: PostgresConnection, moved: list[Any]) -> tuple[list[Any], str | None]:
    """Move SHARD_END / TRIM_HORIZON / LATEST values an older version wrote into the shared layout to the
    project's own sentinel store (Postgres always; Redis when it answers, else say so). On a Redis Cluster,
    first move project keys of the single-node layout into their checkpoint's slot (appended to ``moved``)."""
    import redis as redis_lib

    from durability_pipelines.checkpoints import sentinels

    with db.connection() as conn, conn.transaction():
        converted = sentinels.convert_postgres(conn)
    try:
        url = session.redis_url()
    except services.ServiceUnavailableError as exc:
        return converted, f"not converted ({exc}); run `durability-pipelines migrate` again when Redis answers"
    client = redis_client(url)
    try:
        from durability_pipelines.checkpoints.redis_store import move_to_cluster_layout

        moved += move_to_cluster_layout(client)
        converted += sentinels.convert_redis(client)
    except redis_lib.RedisError as exc:
        return converted, f"not converted ({type(exc).__name__}); run `durability-pipelines migrate` again"
    finally:
        client.close()
    return converted, None


def _change_feed_url(session: Session, args: argparse.Namespace) -> str:
    """The change log's database: --db-url, $DURABILITY_SUPABASE_DB_URL, else the project's Postgres."""
    url = args.db_url or os.environ.get(ENV_SUPABASE_DB_URL)
    if url:
        services.check_postgres(url, source=FLAG_DB_URL if args.db_url else ENV_SUPABASE_DB_URL)
        return psycopg_url(url)
    return session.postgres_url()


def cmd_change_feed(session: Session, args: argparse.Namespace) -> int:
    import psycopg

    from durability_pipelines.sources import supabase_changes as module

    url = _change_feed_url(session, args)
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        if args.change_feed_command == "install":
            log = module.install_change_feed(conn, args.table, schema=args.schema, change_log=args.change_log)
            data = {"action": "installed", "table": args.table, "schema": args.schema, "change_log": str(log)}
            text = (f"installed: changes of {args.schema}.{args.table} are captured into {log}"
                    if "." not in args.table else f"installed: changes of {args.table} are captured into {log}")
        elif args.change_feed_command == "purge":
            groups = [g for g in args.groups.split(",") if g] or None
            with psycopg.connect(session.postgres_url(), autocommit=True, connect_timeout=5) as ckpt_conn:
                deleted = module.purge_channel(conn, args.channel, table=args.table, schema=args.schema,
                                               change_log=args.change_log, groups=groups, keep_last=args.keep_last,
                                               checkpoints_conn=ckpt_conn)
            data = {"action": "purged", "table": args.table, "channel": args.channel, "deleted": deleted}
            text = f"purged {deleted} change-log row(s) of {args.table} acked by every consumer of {args.channel}"
        else:
            module.uninstall_change_feed(conn, args.table, schema=args.schema, change_log=args.change_log,
                                         drop_change_log=args.drop_change_log)
            data = {"action": "uninstalled", "table": args.table, "schema": args.schema,
                    "change_log": args.change_log, "dropped_change_log": args.drop_change_log}
            text = f"uninstalled: {args.table} is no longer captured" + (
                f"; dropped the change log {args.change_log}" if args.drop_change_log else "")
    session.emit(data, text)
    return EXIT_OK


def _wal_names(args: argparse.Namespace) -> tuple[str, str]:
    from durability_pipelines.sources.wal_changes import default_publication_name, default_slot_name

    if args.slot is None and args.group is None:
        from durability_pipelines.checkpoints.errors import ConfigError

        raise ConfigError("name the slot: --group (slot durability_<channel>_<group>) or --slot")
    slot = args.slot or default_slot_name(args.channel, args.group)
    return slot, args.publication or default_publication_name(args.channel)


def cmd_wal(session: Session, args: argparse.Namespace) -> int:
    import psycopg

    from durability_pipelines.sources import wal_changes as module

    slot, publication = _wal_names(args)
    url = _change_feed_url(session, args)
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        if args.wal_command == "install":
            info = module.install_wal_source(conn, publication=publication, slot=slot, tables=args.tables)
            data = {"action": "installed", "publication": publication, "tables": args.tables, **info.as_dict()}
            text = (f"installed: publication {publication} over {', '.join(args.tables)}; slot {slot} at "
                    f"{data['confirmed_flush_lsn']} (it retains WAL from now until consumers ack)")
        elif args.wal_command == "drop":
            dropped = module.drop_wal_source(conn, slot=slot,
                                             publication=publication if args.publication_too else None)
            data = {"action": "dropped", "slot": slot, "publication": publication, "dropped": dropped}
            text = (f"slot {slot}: {'dropped' if dropped['slot'] else 'not there'}"
                    + (f"; publication {publication}: {'dropped' if dropped['publication'] else 'not there'}"
                       if args.publication_too else ""))
        else:
            bound = int(args.max_retained_wal_mb * 1024 * 1024)
            data = module.wal_source_status(conn, slot=slot, publication=publication, max_retained_bytes=bound)
            info = data["slot"]
            text = (f"slot {slot}: " + ("missing" if info is None else
                    f"confirmed {info['confirmed_flush_lsn']}, restart {info['restart_lsn']}, wal_status "
                    f"{info['wal_status']}, retains {info['retained_bytes']} bytes of WAL (bound "
                    f"{args.max_retained_wal_mb:g} MB), {info['lag_bytes']} bytes written since its confirmed "
                    f"position, {'active (pid ' + str(info['active_pid']) + ')' if info['active_pid'] else 'inactive'}")
                    + f"; publication {publication}: "
                    + (", ".join(data["tables"]) or "no tables" if data["publication_exists"] else "missing")
                    + f"; wal_level {data['wal_level']}")
            if info is not None and info["lost"]:
                text += (f"\nWARNING: the slot was invalidated ({info['invalidation_reason'] or info['wal_status']}); "
                         "its consumer cannot read. `wal drop`, `wal install`, then decide the checkpoint "
                         "(docs/supabase.md, \"Operating it\").")
            elif data["retained_over_bound"]:
                text += (f"\nWARNING: the slot retains more WAL than {args.max_retained_wal_mb:g} MB: is its consumer "
                         "running and acking? Drop the slot of a consumer you retired.")
    session.emit(data, text)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """The end-to-end demo (durability_pipelines.demo): interactive with the UI, or bounded."""
    from durability_pipelines.demo import main as demo_main

    return demo_main(args=args)
