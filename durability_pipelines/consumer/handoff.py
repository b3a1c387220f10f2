"""How a run takes its shard: at once when nobody holds it, by graceful hand-off from a live owner.

KCL 3.x's graceful lease handoff, on the lease stores of ``checkpoints/`` (``request_handoff``,
``hand_over``, ``withdraw_request``): a run that finds its shard held by a live run (its predecessor,
which the sensor asked to be replaced before its budget ends) *asks* for the lease and waits; the owner
sees the request at its next batch boundary, saves its checkpoint, and hands the lease over (the epoch
rises, as on any takeover, so the owner is fenced from that instant); the successor reads on from that
checkpoint at once. The successor pays its process start and opens its clients while the owner still
reads, so a planned hand-off leaves the shard unread for about one batch cycle.

The unplanned paths stay as they were: a dead owner (its run finished) is taken over at once, a frozen
or lost one when its lease expires. A live owner that keeps renewing but does not hand over within
``timeout_s`` (it is retrying a failing batch) keeps its shard: the successor withdraws and ends, and the
sensor asks again later. No Dagster import.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from durability_pipelines.checkpoints import Lease
from durability_pipelines.checkpoints.base import LeaseManager
from durability_pipelines.checkpoints.keys import LeaseKey

#: How often a waiting successor asks again: it reads within this long of the hand-off.
HANDOFF_POLL_S = 0.05


@dataclass(frozen=True)
class Claim:
    """The outcome of taking a shard: the lease, or why there is none."""

    lease: Lease | None
    waited_s: float  # from the first ask to holding the lease (or giving up)
    how: str  # "free" | "handed over" | "released or expired" | "owner dead" | "not granted"
    why_not: str = ""

    @property
    def handed_from(self) -> str:
        return self.lease.handed_from if self.lease is not None and self.how == "handed over" else ""


def claim_shard(leases: LeaseManager, key: LeaseKey, me: str, *, duration_s: float, timeout_s: float,
                is_owner_dead: Callable[[str], bool], sleep: Callable[[float], None] = time.sleep,
                clock: Callable[[], float] = time.monotonic, poll_s: float = HANDOFF_POLL_S,
                should_stop: Callable[[], bool] = lambda: False,
                on_wait: Callable[[], None] | None = None) -> Claim:
    """Take ``key`` for ``me``: free -> at once; held by a live owner -> ask and wait for the hand-off;
    held by a dead owner -> steal; held by a frozen one -> take it when it expires.

    Gives up (``lease`` None) when another successor is already waiting, or when the owner is alive (it
    renews its lease) and has not handed over within ``timeout_s``. ``on_wait`` is called once, when the wait
    for a live owner begins (the drain loop starts following the shard then).
    """
    started = clock()
    first_owner: str | None = None
    first_expiry = None
    while True:
        lease = leases.request_handoff(key, me, duration_s)
        if lease.owner == me:
            how = ("handed over" if lease.handed_from else
                   "free" if first_owner is None else "released or expired")
            return Claim(lease, clock() - started, how)
        if lease.requested_by != me:
            return Claim(None, clock() - started, "not granted",
                         f"run {lease.requested_by} is already waiting for shard {key} (held by {lease.owner}); "
                         "exactly one successor gets a shard, and this run ends without touching it")
        if is_owner_dead(lease.owner):
            stolen = leases.acquire(key, me, duration_s, steal=True)
            if stolen is not None:
                return Claim(stolen, clock() - started, "owner dead")
        if first_owner is None:
            first_owner, first_expiry = lease.owner, lease.expires_at
            if on_wait is not None:
                on_wait()
        renewing = lease.owner != first_owner or lease.expires_at != first_expiry
        if renewing and clock() - started >= timeout_s:
            after = leases.withdraw_request(key, me)
            if after is not None and after.owner == me:  # handed over while we withdrew
                return Claim(after, clock() - started, "handed over")
            return Claim(None, clock() - started, "not granted",
                         f"run {lease.owner} holds shard {key} and renews its lease, but did not hand it over "
                         f"within handoff_timeout_s ({timeout_s:g} s; it is probably retrying a batch). It keeps "
                         "the shard; this run withdrew its request and ends without touching it")
        if should_stop():  # the run is being stopped: it takes nothing it would have to give back
            after = leases.withdraw_request(key, me)
            if after is not None and after.owner == me:
                return Claim(after, clock() - started, "handed over")
            return Claim(None, clock() - started, "not granted", "the run was stopped while it waited for the shard")
        sleep(poll_s)
