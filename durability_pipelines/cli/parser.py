"""The argument parser: every command, its flags and their help."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from durability_pipelines import services
from durability_pipelines.checkpoints.ordering import MAX_DIGITS
from durability_pipelines.cli.checkpoints import (
    cmd_checkpoints_export,
    cmd_checkpoints_get,
    cmd_checkpoints_list,
    cmd_checkpoints_repair,
    cmd_checkpoints_rewind,
    cmd_checkpoints_set,
)
from durability_pipelines.cli.dead_letters import (
    cmd_dead_letters_list,
    cmd_dead_letters_resolve,
    cmd_dead_letters_retry,
)
from durability_pipelines.cli.exit_codes import EXIT_USAGE
from durability_pipelines.cli.leases import cmd_leases_list, cmd_leases_release
from durability_pipelines.cli.schema import cmd_change_feed, cmd_migrate, cmd_wal
from durability_pipelines.cli.secrets import ENV_SUPABASE_DB_URL, scrub
from durability_pipelines.cli.session import BACKENDS, ENV_BACKEND


class _Parser(argparse.ArgumentParser):
    """argparse that masks URLs in its error messages (they echo the offending argument)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {scrub(message, sys.argv)}\n")




def _who_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--by", metavar="WHO", help="who is acting, recorded with the change (default: $USER@hostname)")


def _key_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="e.g. dynamodb or supabase")
    p.add_argument("stream", help="the table / channel name")
    p.add_argument("group", help="consumer group")
    p.add_argument("consumer", help="consumer id")
    p.add_argument("shard", nargs="?", default=None, help="shard id; omit for unsharded streams (supabase)")


def _filter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", help="only this adapter")
    p.add_argument("--stream", help="only this stream")
    p.add_argument("--group", help="only this consumer group")
    p.add_argument("--consumer", help="only this consumer id")


def _global_args(p: argparse.ArgumentParser, *, top: bool) -> None:
    """Global flags, accepted before or after the subcommand (``SUPPRESS`` keeps the top-level value)."""
    d = (lambda v: v) if top else (lambda v: argparse.SUPPRESS)
    p.add_argument("--backend", choices=BACKENDS, default=d(os.environ.get(ENV_BACKEND) or "hybrid"),
                   help=f"checkpoint store (default: ${ENV_BACKEND}, else hybrid)")
    p.add_argument("--postgres-url", default=d(None), metavar="URL",
                   help=f"Postgres URL (default: ${services.ENV_POSTGRES_URL}, else the embedded server); "
                   "prefer the environment variable: arguments are visible in `ps`")
    p.add_argument("--redis-url", default=d(None), metavar="URL",
                   help=f"Redis URL (default: ${services.ENV_REDIS_URL}, else the embedded server)")
    p.add_argument("--json", action="store_true", default=d(False), help="machine-readable output")


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    _global_args(common, top=False)
    parser = _Parser(
        prog="durability-pipelines",
        description="Operate durability_pipelines consumers: inspect and repair checkpoints, release stuck "
        "leases, retry dead-lettered batches, migrate the schema. Exit codes: 0 ok, 1 refused, 2 bad input "
        "(also a malformed server URL) or not available, 3 server/schema unavailable, 4 not found, "
        "5 credentials refused by the server.",
        epilog="Passwords are never printed: URLs in messages are masked. See docs/cli.md for recipes.",
    )
    _global_args(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def add(parent: Any, name: str, help_text: str, func: Callable[..., int], **kw: Any) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help_text, description=kw.pop("description", help_text),
                              parents=[common], **kw)
        p.set_defaults(func=func)
        return p

    # checkpoints
    cp = sub.add_parser("checkpoints", help="inspect and repair acked checkpoints",
                        description="Acked checkpoints: the position each consumer resumes after.")
    cps = cp.add_subparsers(dest="checkpoints_command", metavar="ACTION", parser_class=_Parser)
    cps.required = True
    p = add(cps, "list", "every checkpoint, with the value in each store and their drift (hybrid)", cmd_checkpoints_list,
            description="List every checkpoint. With the hybrid backend both stores are shown: drift "
            "'redis-ahead' is normal up to the flush bound; 'postgres-ahead' or 'invalid-*' need attention. For a "
            "consumer configured with the postgres backend, Redis only holds the mirror's copy: its drift reads "
            "'redis-copy-behind' / 'redis-copy-ahead' (nothing is re-processed). See docs/cli.md.")
    _filter_args(p)
    p = add(cps, "get", "one checkpoint: value per store and recent history", cmd_checkpoints_get)
    _key_args(p)
    p.add_argument("--history", type=int, default=5, metavar="N", help="history entries per store (default 5)")
    p = add(cps, "set", "set a checkpoint: forward only, unless --force", cmd_checkpoints_set,
            description="Set a checkpoint. Monotonic by default: moving backwards is refused (exit 1). "
            "--force writes unconditionally (backwards, or over a garbage value) and records --by and --reason "
            "in the checkpoint history. Stop the consumer's sensor first: a running worker keeps its own position.")
    _key_args(p)
    p.add_argument("--sequence", required=True, metavar="S",
                   help=f"1-{MAX_DIGITS} decimal digits, TRIM_HORIZON, LATEST or SHARD_END")
    p.add_argument("--force", action="store_true", help="write even if it moves backwards (requires --reason)")
    p.add_argument("--reason", metavar="TEXT", help="why; required with --force, recorded in the history")
    _who_arg(p)
    p = add(cps, "rewind", "move a checkpoint back for a replay (to a sequence or a point in time)",
            cmd_checkpoints_rewind,
            description="Rewind a checkpoint so the consumer replays from there, on purpose. Recorded like "
            "set --force (--by, --reason), and the position becomes where replay is allowed from: a consumer "
            "whose sink is not idempotent (a Realtime broadcast) replays after such a rewind, and only after one "
            "(a checkpoint another worker moved back stops its shard). --to-time uses the last history entry at "
            "or before that time (Postgres checkpoint_history for postgres/hybrid, the Redis history stream for "
            "redis).")
    _key_args(p)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--to-sequence", "--to", dest="to_sequence", metavar="S",
                        help="the position to resume after (--to for short)")
    target.add_argument("--to-time", metavar="ISO8601", help="e.g. 2024-05-01T12:30:00Z (naive = UTC)")
    p.add_argument("--reason", required=True, metavar="TEXT", help="why (recorded in the history)")
    p.add_argument("--dry-run", action="store_true", help="show the target without writing")
    _who_arg(p)
    p = add(cps, "repair", "undo a foreign regression: put the last recorded position back into both stores",
            cmd_checkpoints_repair,
            description="Another worker moved a checkpoint backwards (the audit says regressed-externally). "
            "Put back the highest position the project recorded (or a store holds), in Redis and Postgres; "
            "never moves a store backwards; recorded in both histories.")
    p.add_argument("key", nargs="?", metavar="KEY", help="the Redis key, e.g. checkpoint:dynamodb:orders:workers:consumer-a:shard-1")
    for name in ("adapter", "stream", "group", "consumer", "shard"):
        p.add_argument(f"--{name}", help=f"instead of KEY: the key's {name}")
    _who_arg(p)
    p = add(cps, "export", "write every checkpoint as CSV or JSON (for audits and backups)", cmd_checkpoints_export)
    _filter_args(p)
    p.add_argument("--format", choices=("csv", "json"), default="csv", help="default csv")
    p.add_argument("--output", metavar="FILE", help="file to write (default: stdout)")

    # leases
    lp = sub.add_parser("leases", help="inspect and release shard leases",
                        description="Shard leases: one owner per shard, fenced by a rising epoch.")
    lps = lp.add_subparsers(dest="leases_command", metavar="ACTION", parser_class=_Parser)
    lps.required = True
    add(lps, "list", "every lease with owner, epoch and state (held / expired / released)", cmd_leases_list)
    p = add(lps, "release", "release a lease so another worker can take the shard", cmd_leases_release,
            description="Release a shard lease. An expired lease (or one you own, --owner) is released "
            "as is; a live lease needs --force. The previous holder's later writes are rejected.")
    p.add_argument("adapter")
    p.add_argument("stream")
    p.add_argument("group")
    p.add_argument("shard", nargs="?", default=None, help="omit for unsharded streams")
    p.add_argument("--force", action="store_true", help="release even if another owner holds it live")
    p.add_argument("--owner", help="release only if held by this owner (no --force needed)")
    _who_arg(p)

    # dead letters
    dp = sub.add_parser("dead-letters", help="list, retry and resolve dead-lettered batches",
                        description="Batches that exhausted their retries. An open dead letter stops its shard.")
    dps = dp.add_subparsers(dest="dead_letters_command", metavar="ACTION", parser_class=_Parser)
    dps.required = True
    p = add(dps, "list", "dead letters, oldest first", cmd_dead_letters_list)
    p.add_argument("--consumer", help="only this consumer (config name)")
    p.add_argument("--status", choices=("open", "retry", "resolved"))
    p = add(dps, "retry", "unblock the shard: the sensor re-dispatches it from the acked checkpoint",
            cmd_dead_letters_retry)
    p.add_argument("id", type=int)
    p.add_argument("--note", help="why (recorded)")
    _who_arg(p)
    p = add(dps, "resolve", "close a dead letter (unblocks the shard too)", cmd_dead_letters_resolve)
    p.add_argument("id", type=int)
    p.add_argument("--note", required=True, help="how it was resolved (recorded)")
    _who_arg(p)

    add(sub, "migrate", "create or upgrade the Postgres schema (idempotent)", cmd_migrate,
        description="Create or upgrade every table this project uses (checkpoints, history, leases, dead "
        "letters, gaps, cursor mirror, events). Safe to run repeatedly and concurrently.")

    fp = sub.add_parser("change-feed", help="install / uninstall the Postgres change-log trigger (Supabase source)",
                        description="The durable change feed: a trigger copying every row change of a table "
                        "into an append-only change log the supabase consumer reads.")
    fps = fp.add_subparsers(dest="change_feed_command", metavar="ACTION", parser_class=_Parser)
    fps.required = True
    for name, help_text in (("install", "capture a table's changes into the change log (idempotent)"),
                            ("uninstall", "stop capturing a table"),
                            ("purge", "delete change-log rows of TABLE that every consumer group of --channel acked")):
        p = add(fps, name, help_text, cmd_change_feed)
        p.add_argument("table", help="source table (or schema.table)")
        p.add_argument("--schema", default="public", help="schema of TABLE (default public)")
        p.add_argument("--change-log", default="durability_change_log", help="change-log table name")
        p.add_argument("--db-url", metavar="URL",
                       help=f"database holding the table (default: ${ENV_SUPABASE_DB_URL}, else the project Postgres)")
        if name == "uninstall":
            p.add_argument("--drop-change-log", action="store_true",
                           help="also drop the change log (stops capture of every table writing to it)")
        if name == "purge":
            p.add_argument("--channel", required=True, help="the consumers' channel (checkpoint stream)")
            p.add_argument("--groups", default="",
                           help="comma-separated consumer groups that must all have acked (a group that never "
                           "checkpointed must be named, or its unread changes could be purged)")
            p.add_argument("--keep-last", type=int, default=0, help="keep the newest N rows anyway (default 0)")

    wp = sub.add_parser("wal", help="install / inspect / drop the publication and replication slot (WAL source)",
                        description="The WAL source (source.kind supabase_wal): a publication over the tables and "
                        "one logical replication slot per consumer group, read with the built-in pgoutput plugin.")
    wps = wp.add_subparsers(dest="wal_command", metavar="ACTION", parser_class=_Parser)
    wps.required = True
    for name, help_text in (("install", "create the publication over TABLES and the slot (idempotent)"),
                            ("status", "the slot's position, the WAL it retains, whether it was invalidated"),
                            ("drop", "drop the slot (the server frees its WAL) and, with --publication-too, "
                                     "the publication")):
        p = add(wps, name, help_text, cmd_wal)
        p.add_argument("--channel", required=True, help="the consumer's channel (names the defaults)")
        p.add_argument("--group", default=None, help="the consumer group (default slot durability_<channel>_<group>)")
        p.add_argument("--slot", default=None, help="slot name (default durability_<channel>_<group>)")
        p.add_argument("--publication", default=None, help="publication name (default durability_<channel>)")
        p.add_argument("--db-url", metavar="URL",
                       help=f"database to replicate from (default: ${ENV_SUPABASE_DB_URL}, else the project Postgres)")
        if name == "install":
            p.add_argument("tables", nargs="+", help="tables of the publication (table or schema.table)")
        if name == "status":
            p.add_argument("--max-retained-wal-mb", type=float, default=1024.0, metavar="MB",
                           help="say WARNING (and retained_over_bound: true) when the slot retains more WAL than "
                           "this: the consumer's max_retained_wal_mb (default 1024)")
        if name == "drop":
            p.add_argument("--publication-too", action="store_true",
                           help="also drop the publication (other groups' slots of the channel use it)")

    from durability_pipelines.demo import build_parser as build_demo_parser

    p = sub.add_parser("demo", help="run every part on embedded services: interactive (UI) or bounded (--events)",
                       description="Starts PostgreSQL/Redis (embedded unless DURABILITY_*_URL are set), a local "
                       "DynamoDB endpoint, the Supabase change feed and Dagster with the three starters. "
                       "With --events N it runs headless, stops by itself and prints a JSON summary last.")
    build_demo_parser(p)
    p.set_defaults(func=None)
    return parser
