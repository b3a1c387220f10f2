"""``leases list|release``."""

from __future__ import annotations

import argparse
from datetime import datetime, timezone
from typing import Any

from durability_pipelines.checkpoints.base import (
    Lease,
    LeaseManager,
)
from durability_pipelines.checkpoints.keys import LeaseKey
from durability_pipelines.cli.exit_codes import EXIT_NOT_FOUND, EXIT_OK, CliError
from durability_pipelines.cli.session import Session, default_who, iso, table


def lease_state(lease: Lease, now: datetime) -> str:
    if not lease.owner:
        return "released"
    return "held" if lease.expires_at is not None and lease.expires_at > now else "expired"


def handoff_state(lease: Lease) -> str:
    """The graceful hand-off, as an operator reads it: who waits for the lease, or who handed it over."""
    if lease.requested_by:
        return f"requested by {lease.requested_by} (asked {iso(lease.requested_at)})"
    if lease.handed_from:
        return f"handed over by {lease.handed_from} at {iso(lease.handed_at)}"
    return ""


def _lease_dict(store: str, lease: Lease, now: datetime) -> dict[str, Any]:
    return {"store": store, "lease": str(lease.key), "adapter": lease.key.adapter, "stream": lease.key.stream,
            "group": lease.key.group, "shard": lease.key.shard, "owner": lease.owner, "epoch": lease.epoch,
            "expires_at": iso(lease.expires_at), "state": lease_state(lease, now),
            "requested_by": lease.requested_by, "requested_at": iso(lease.requested_at),
            "handed_from": lease.handed_from, "handed_at": iso(lease.handed_at), "handoff": handoff_state(lease)}


def cmd_leases_list(session: Session, args: argparse.Namespace) -> int:
    now = datetime.now(timezone.utc)
    data = [_lease_dict(name, lease, now) for name, manager in session.lease_managers() for lease in manager.list()]
    data.sort(key=lambda d: (d["lease"], d["store"]))

    def text() -> str:
        if not data:
            return "no leases"
        return table(["lease", "store", "owner", "epoch", "state", "expires at", "hand-off"],
                     [[d["lease"], d["store"], d["owner"], d["epoch"], d["state"], d["expires_at"], d["handoff"]]
                      for d in data])

    session.emit(data, text)
    return EXIT_OK


def cmd_leases_release(session: Session, args: argparse.Namespace) -> int:
    key = LeaseKey(args.adapter, args.stream, args.group, args.shard)
    now = datetime.now(timezone.utc)
    by = args.by or default_who()
    found: list[tuple[str, LeaseManager, Lease]] = []
    for name, manager in session.lease_managers():
        lease = manager.get(key)
        if lease is None:
            continue
        if lease_state(lease, now) == "held" and not args.force and lease.owner != args.owner:
            raise CliError(
                f"refused: lease {key} is held by {lease.owner} (epoch {lease.epoch}) in {name} until "
                f"{iso(lease.expires_at)}. If that worker is dead or stuck, re-run with --force (its later "
                "writes are then rejected); nothing was released."
            )
        found.append((name, manager, lease))
    if not found:
        raise CliError(f"no lease {key} in {' or '.join(n for n, _ in session.lease_managers())}; "
                       "see `durability-pipelines leases list`", EXIT_NOT_FOUND)
    results = []
    for name, manager, lease in found:
        state = lease_state(lease, now)
        released = False if state == "released" else manager.release(lease)
        if state != "released" and not released:
            raise CliError(f"lease {key} changed in {name} while releasing (another worker took it); "
                           "check `leases list` and try again")
        results.append({"store": name, "lease": str(key), "previous_owner": lease.owner, "epoch": lease.epoch,
                        "previous_state": state, "released": released,
                        "forced": bool(args.force and state == "held"), "by": by})
    lines = []
    for r in results:
        if not r["released"]:
            lines.append(f"{r['store']}: lease {key} was already released (epoch {r['epoch']})")
        else:
            how = f"FORCED by {by}" if r["forced"] else f"by {by}"
            lines.append(f"{r['store']}: released lease {key} held by {r['previous_owner']} at epoch {r['epoch']} "
                         f"({r['previous_state']}), {how}; the next acquire takes it over with epoch {r['epoch'] + 1}")
    session.emit(results, "\n".join(lines))
    return EXIT_OK
