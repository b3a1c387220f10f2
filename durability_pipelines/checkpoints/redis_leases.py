"""Shard leases in Redis (``lease.lua``), with the per-checkpoint copies a Redis Cluster needs."""

from __future__ import annotations

from datetime import datetime, timezone
from importlib import resources

import redis

from durability_pipelines.checkpoints.base import (
    HANDOFF_REQUEST_FRESH_S,
    Lease,
    LeaseManager,
)
from durability_pipelines.checkpoints.errors import (
    lease_lost,
)
from durability_pipelines.checkpoints.keys import LeaseKey
from durability_pipelines.checkpoints.redis_io import as_text, redis_errors
from durability_pipelines.redis_client import is_cluster

_SCRIPT_DIR = resources.files("durability_pipelines.checkpoints")
LEASE_LUA = (_SCRIPT_DIR / "lease.lua").read_text()
# Redis Cluster only: the per-checkpoint lease copies (each file's header says its KEYS, ARGV and reply).
REGISTER_COPY_LUA = (_SCRIPT_DIR / "register_lease_copy.lua").read_text()
SET_COPY_LUA = (_SCRIPT_DIR / "set_lease_copy.lua").read_text()


_FRESH_MS = int(HANDOFF_REQUEST_FRESH_S * 1000)
_FIELDS = ("owner", "epoch", "expires", "requested_by", "requested_at", "handed_from", "handed_at")


def _ms(raw: object) -> datetime | None:
    value = int(raw or 0)  # type: ignore[call-overload]
    return datetime.fromtimestamp(value / 1000, timezone.utc) if value else None


def _lease(key: LeaseKey, fields: list) -> Lease:
    """A lease from ``lease.lua``'s reply (after ``ok``) or an HMGET of ``_FIELDS``."""
    owner, epoch, expires, requested_by, requested_at, handed_from, handed_at = (list(fields) + [None] * 7)[:7]
    return Lease(key, as_text(owner) or "", int(epoch or 0), _ms(expires) or datetime.fromtimestamp(0, timezone.utc),
                 as_text(requested_by) or "", _ms(requested_at), as_text(handed_from) or "", _ms(handed_at))


class RedisLeaseManager(LeaseManager):
    """Leases in ``durability:lease:...`` hashes (``lease.lua``).

    On a Redis Cluster a checkpoint's save cannot read the lease (another slot), so it reads a *copy*
    in the checkpoint's slot (``durability:leasecopy:{checkpoint:...}``, same fields). The copies keep
    the fencing rule by two steps, each atomic on its own node:

    * a holder whose save finds its copy missing or expired refreshes it (:meth:`refresh_copy`): on the
      lease's node, "is the lease still mine, unexpired? then register this copy", then on the copy's
      node "write (owner, epoch, expiry) unless a higher epoch, or this epoch fenced, is there";
    * every takeover, release, revoke or sync first changes the lease, then overwrites every registered
      copy with the new holder and epoch (:meth:`_fence_copies`) before it returns.

    So once ``acquire`` (or ``sync``/``release``/``revoke``) has returned, no save under an older epoch
    succeeds on any node: a refresh that began before the takeover registered its copy before the
    takeover read the set, and loses to the higher epoch whichever lands last. What is not atomic: while a
    takeover is still overwriting copies (one round trip per copy), the old holder's unexpired copy
    still admits its saves; they all happen before the new holder's ``acquire`` returns.
    """

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._script = client.register_script(LEASE_LUA)
        self._cluster = is_cluster(client)
        if self._cluster:
            self._register_copy = client.register_script(REGISTER_COPY_LUA)
            self._set_copy = client.register_script(SET_COPY_LUA)

    def _call(self, key: LeaseKey, *args: object) -> tuple[bool, Lease]:
        with redis_errors(self._client):
            ok, *fields = self._script(keys=[key.redis_key], args=list(args))
        return bool(ok), _lease(key, fields)

    def _fence_copies(self, lease: Lease, left_ms: int) -> None:
        """Redis Cluster: make every registered copy of ``lease.key`` say what the lease says now."""
        if not self._cluster:
            return
        with redis_errors(self._client):
            for copy in self._client.smembers(lease.key.copies_key):
                self._set_copy(keys=[copy], args=[lease.owner, lease.epoch, max(0, left_ms), "fence"])

    def refresh_copy(self, lease: Lease, copy_key: str) -> None:
        """Redis Cluster: write ``lease`` to the checkpoint's copy, if it is still the lease of record;
        raises ``LeaseLostError`` (naming the holder of record) if not."""
        with redis_errors(self._client):
            answer = self._register_copy(keys=[lease.key.redis_key, lease.key.copies_key],
                                         args=[lease.owner, lease.epoch, copy_key])
            if not int(answer[0]):
                raise lease_lost(lease, as_text(answer[1]), int(answer[2]) if answer[2] else None)
            self._set_copy(keys=[copy_key], args=[lease.owner, lease.epoch, int(answer[1]), "refresh"])

    def acquire(self, key: LeaseKey, owner: str, duration_s: float = 60.0, *, steal: bool = False) -> Lease | None:
        ok, lease = self._call(key, "acquire", owner, int(duration_s * 1000), "1" if steal else "0")
        if ok:
            self._fence_copies(lease, int(duration_s * 1000))
        return lease if ok else None

    def renew(self, lease: Lease, duration_s: float = 60.0) -> Lease:
        ok, now = self._call(lease.key, "renew", lease.owner, int(duration_s * 1000), lease.epoch)
        if not ok:
            raise lease_lost(lease, now.owner, now.epoch)
        return now  # copies are refreshed on demand, by the next save that finds its copy expired

    def release(self, lease: Lease) -> bool:
        ok, now = self._call(lease.key, "release", lease.owner, 0, lease.epoch)
        if ok:
            self._fence_copies(now, 0)
        return ok

    def sync(self, lease: Lease, duration_s: float = 60.0) -> bool:
        """Mirror a lease granted elsewhere (hybrid), valid for ``duration_s`` more; the highest epoch wins."""
        ok, now = self._call(lease.key, "sync", lease.owner, int(duration_s * 1000), lease.epoch)
        if ok:
            self._fence_copies(now, int(duration_s * 1000))
        return ok

    def revoke(self, key: LeaseKey) -> None:
        """Expire the copy now, whoever holds it: its holder's fenced saves are refused from here on."""
        _, now = self._call(key, "revoke", "", 0, 0)
        self._fence_copies(now, 0)

    def request_handoff(self, key: LeaseKey, requester: str, duration_s: float = 60.0) -> Lease:
        _, lease = self._call(key, "request", requester, int(duration_s * 1000), 0, _FRESH_MS)
        if lease.owner == requester:
            self._fence_copies(lease, int(duration_s * 1000))  # taken (as acquire): the copies say so first
        return lease

    def hand_over(self, lease: Lease, duration_s: float = 60.0) -> Lease | None:
        ok, now = self._call(lease.key, "handover", lease.owner, int(duration_s * 1000), lease.epoch, _FRESH_MS)
        if not ok:
            return None
        self._fence_copies(now, int(duration_s * 1000))
        return now

    def withdraw_request(self, key: LeaseKey, requester: str) -> Lease | None:
        if self.get(key) is None:
            return None
        return self._call(key, "withdraw", requester, 0, 0)[1]

    def get(self, key: LeaseKey) -> Lease | None:
        with redis_errors(self._client):
            fields = self._client.hmget(key.redis_key, *_FIELDS)
        if fields[1] is None:
            return None
        return _lease(key, fields)

    def list(self) -> list[Lease]:
        from durability_pipelines.checkpoints.keys import LEASE_PREFIX

        out = []
        with redis_errors(self._client):
            for raw in self._client.scan_iter(match=f"{LEASE_PREFIX}:*", count=1000):
                try:
                    key = LeaseKey.parse(raw)
                except ValueError:
                    continue  # not a lease key of this layout
                if (lease := self.get(key)) is not None:
                    out.append(lease)
        return sorted(out, key=lambda lease: lease.key)
