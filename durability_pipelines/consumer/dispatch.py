"""The sensor's decision each tick, as a pure function of what it observed.

Two positions per shard: the *acked* checkpoint (only the job moves it) and
the *dispatched* position in the sensor cursor (moves when a run is
submitted).  Each tick reconciles them:

* at most one in-flight run per shard;
* ``run_key = <consumer>:<shard>:<start position>:a<attempt>`` so a repeated
  tick never launches the same batch twice (Dagster dedups run keys);
* a run that failed (or never launched) is re-dispatched from the acked
  checkpoint with the next attempt number — Dagster blocks a failed run's key
  forever, so without the suffix the batch would be silently skipped;
* a shard with an open dead letter is not dispatched (policy ``stop``);
* a run may own several shards (``max_shards_per_run``, as a KCL worker owns several leases): the shards
  that need a run this tick are packed into runs of up to that many; a shard that needs one while a
  successor is being dispatched joins the successor when it has room;
* graceful hand-off: once an in-flight run is due to be replaced (``successor_due``: its budget ends
  soon), a *successor* run is dispatched beside it; it asks for the shard's lease and the owner hands
  it over after its batch (``consumer/handoff.py``). When the owner ends, the successor becomes the
  shard's run of record. At most two runs per shard are in flight: the owner and one successor.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

#: the cursor's, run key's and tag's spelling of a shard (``NO_SHARD`` for none), re-exported for the sensor
from durability_pipelines.checkpoints.keys import shard_to_tag as shard_id

log = logging.getLogger(__name__)
CURSOR_VERSION = 1


class RunState(str, enum.Enum):
    IN_PROGRESS = "in_progress"
    SUCCESS = "success"
    FAILURE = "failure"  # failed or canceled
    MISSING = "missing"  # no run with that key (launch failed)


@dataclass
class ShardCursor:
    dispatched: str | None = None  # acked position the in-flight run started after
    run_key: str | None = None
    attempt: int = 0
    backlog: bool = False  # the last tick saw unread data (or a run in flight): used by the stale check
    successor_key: str | None = None  # run dispatched to take the shard over from run_key by hand-off


@dataclass
class SensorCursor:
    shards: dict[str, ShardCursor] = field(default_factory=dict)
    v: int = CURSOR_VERSION
    stream_identity: str | None = None  # e.g. the DynamoDB stream label the positions belong to

    def to_json(self) -> str:
        return json.dumps(
            {"v": self.v, "stream_identity": self.stream_identity,
             "shards": {k: asdict(v) for k, v in sorted(self.shards.items())}},
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, raw: str | None) -> SensorCursor:
        """Parse a cursor; a garbage one is replaced by an empty one (logged).

        Nothing is lost by that: the acked checkpoints are the truth, and run
        keys dedup any batch that is already running.
        """
        if not raw:
            return cls()
        try:
            data = json.loads(raw)
            shards = {str(k): ShardCursor(**v) for k, v in data.get("shards", {}).items()}
            return cls(shards=shards, v=int(data.get("v", CURSOR_VERSION)), stream_identity=data.get("stream_identity"))
        except (ValueError, TypeError, AttributeError) as exc:
            log.warning("ignoring unreadable sensor cursor (%s); rebuilding it from acked checkpoints", exc)
            return cls()


#: Slack for clock differences between the sensor's host and the store that dates the lease.
DEAD_RUN_GRACE_S = 10.0


@dataclass(frozen=True)
class InFlightRun:
    """What the sensor knows of a run Dagster still counts as in flight."""

    run_id: str
    status: str  # STARTING | STARTED | ... (QUEUED / NOT_STARTED runs are waiting, never dead)
    started_at: float | None  # epoch seconds the run started executing (None: not yet)


@dataclass(frozen=True)
class LeaseView:
    owner: str
    expires_at: float  # epoch seconds, by the store's clock


def dead_run_reason(run: InFlightRun, lease: LeaseView | None, *, now: float, lease_duration_s: float,
                    run_budget_s: float) -> str | None:
    """Why an in-flight run is dead, or None while it may be alive.

    A live run renews its shard's lease every third of ``lease_duration_s``, so a lease it holds that has
    expired means its process (or its whole node) is gone: Dagster's own monitoring cannot see a worker
    of a node that died, and the run would block its shard (one run per shard) for ``max_runtime_seconds``.
    A run that has been executing longer than it could while alive (``run_budget_s``: its time budget, an
    idle poll and a lease) without holding the lease is dead too (it died before taking it).
    """
    if run.status not in ("STARTED", "STARTING", "CANCELING") or run.started_at is None:
        return None
    held = lease is not None and lease.owner == run.run_id
    if held and lease is not None and now > lease.expires_at + DEAD_RUN_GRACE_S:
        return (f"run {run.run_id} holds the shard's lease, which expired {now - lease.expires_at:.0f} s ago without "
                "a renewal (a live run renews it every third of lease_duration_s): its process or node is gone")
    if not (held and lease is not None and lease.expires_at > now) and (
            now - run.started_at > run_budget_s + lease_duration_s + DEAD_RUN_GRACE_S):
        return (f"run {run.run_id} has been executing for {now - run.started_at:.0f} s, longer than a live run can "
                "(max_run_seconds + 2 x handoff_timeout_s + max_idle_s + lease_duration_s), without holding the shard's lease")
    return None


def make_run_key(consumer: str, shard: str | None, start_after: str | None, attempt: int) -> str:
    return f"{consumer}:{shard_id(shard)}:{start_after or 'INITIAL'}:a{attempt}"


def make_successor_key(consumer: str, shard: str | None, start_after: str | None, owner_key: str, n: int) -> str:
    """The run key of the ``n``-th successor dispatched for the run ``owner_key``: unique per owner (a digest
    of its key, so that a chain of hand-offs does not grow the keys) and per try."""
    return f"{make_run_key(consumer, shard, start_after, 0).rsplit(':', 1)[0]}:from-{_digest(owner_key)}:{n}"


def _digest(run_key: str) -> str:
    return hashlib.sha1(run_key.encode()).hexdigest()[:10]


@dataclass(frozen=True)
class Dispatch:
    """One run to launch: a shard (``shard``/``start_after``) and, in a run that owns several (up to
    ``max_shards_per_run``), the others in ``more``."""

    shard: str | None
    start_after: str | None
    run_key: str
    attempt: int
    successor_of: str | None = None  # the run key of the run this one takes the shards over from
    more: tuple[tuple[str | None, str | None], ...] = ()  # further (shard, start_after) of a multi-shard run

    @property
    def shards(self) -> tuple[str | None, ...]:
        return (self.shard, *(s for s, _ in self.more))

    @property
    def members(self) -> tuple[tuple[str | None, str | None], ...]:
        return ((self.shard, self.start_after), *self.more)


def make_group_key(consumer: str, members: list[tuple[str | None, str | None, int]]) -> str:
    """The run key of a run that owns several shards: a digest of its (shard, start, attempt) members, so that
    a repeated tick dedups it and a re-dispatch after a failure (next attempt) gets a new one."""
    spelled = ";".join(f"{shard_id(s)}@{start or 'INITIAL'}:a{a}" for s, start, a in members)
    return f"{consumer}:{shard_id(members[0][0])}+{len(members) - 1}:{_digest(spelled)}"


def shard_set_tag(consumer: str, shards: tuple[str | None, ...] | list[str | None]) -> str:
    """The run queue's per-shard-set tag value: one shard is ``<consumer>:<shard>``; a set is named by a
    digest of its sorted ids, so an owner and its successor (the same set) share one concurrency limit."""
    if len(shards) == 1:
        return f"{consumer}:{shard_id(shards[0])}"
    return f"{consumer}:set-{_digest(','.join(sorted(shard_id(s) for s in shards)))}"


@dataclass
class TickPlan:
    cursor: SensorCursor
    dispatches: list[Dispatch]
    skipped: dict[str, str]  # shard -> why nothing was dispatched


@dataclass
class _Wants:
    """What the per-shard pass of a tick decided; packed into runs afterwards."""

    new: list[tuple[str | None, str | None, int]] = field(default_factory=list)  # (shard, start, attempt)
    #: owner run key -> its shards due a successor: [(shard, start, successor number)]
    successors: dict[str, list[tuple[str | None, str | None, int]]] = field(default_factory=dict)


def plan_tick(
    consumer: str,
    cursor: SensorCursor,
    *,
    shards: list[str | None],
    acked: Mapping[str | None, str | None],
    has_new: Callable[[str | None, str | None], bool],
    run_state: Callable[[str, str | None], RunState],
    blocked: set[str],
    max_dispatches: int = 100,
    successor_due: Callable[[str, str | None], bool] = lambda run_key, shard: False,
    max_shards_per_run: int = 1,
) -> TickPlan:
    """Decide each shard (per-shard pass), then pack the shards that need a run into runs of up to
    ``max_shards_per_run`` (``_pack``). ``max_dispatches`` bounds the runs launched per tick."""
    new = SensorCursor(shards=dict(cursor.shards), stream_identity=cursor.stream_identity)
    skipped: dict[str, str] = {}
    wants = _Wants()
    room = max_dispatches * max_shards_per_run  # shards this tick may hand to new runs

    def wanted() -> int:
        return len(wants.new) + sum(len(v) for v in wants.successors.values())

    for shard in shards:
        sid = shard_id(shard)
        start = acked.get(shard)
        sc = new.shards.get(sid, ShardCursor())
        attempt = sc.attempt
        if sc.run_key:
            state = run_state(sc.run_key, shard)
            successor = run_state(sc.successor_key, shard) if sc.successor_key else None
            if state is RunState.IN_PROGRESS:
                if successor is RunState.IN_PROGRESS:
                    skipped[sid] = f"run {sc.run_key} in flight; {sc.successor_key} waiting to take over"
                    new.shards[sid] = ShardCursor(sc.dispatched, sc.run_key, sc.attempt, True, sc.successor_key)
                    continue
                if (shard or "") not in blocked and wanted() < room and successor_due(sc.run_key, shard):
                    wants.successors.setdefault(sc.run_key, []).append((shard, start, _successor_number(sc)))
                    new.shards[sid] = ShardCursor(sc.dispatched, sc.run_key, sc.attempt, True, sc.successor_key)
                else:
                    skipped[sid] = f"run {sc.run_key} in flight"
                    new.shards[sid] = ShardCursor(sc.dispatched, sc.run_key, sc.attempt, True, sc.successor_key)
                continue
            if successor is RunState.IN_PROGRESS:
                # The owner ended (handed over, or died): its successor is the shard's run now.
                skipped[sid] = f"run {sc.successor_key} took over from {sc.run_key}"
                new.shards[sid] = ShardCursor(start, sc.successor_key, 0, backlog=True)
                continue
            # A new start position gets a fresh key; the same one needs the next attempt number
            # (Dagster never re-launches a run key it has seen).
            attempt = 0 if start != sc.dispatched else sc.attempt + 1
            if state is not RunState.SUCCESS:
                log.warning("consumer %s shard %s: run %s ended %s; re-dispatching from the acked checkpoint %s",
                            consumer, sid, sc.run_key, state.value, start)
            sc = ShardCursor(dispatched=start, run_key=None, attempt=attempt)
            new.shards[sid] = sc
        if (shard or "") in blocked:
            skipped[sid] = "open dead letter: stopped until an operator acts"
            new.shards[sid] = ShardCursor(sc.dispatched, sc.run_key, sc.attempt, backlog=True)
            continue
        if wanted() >= room:
            skipped[sid] = "dispatch budget of this tick used"
            continue
        if not has_new(shard, start):
            skipped[sid] = "caught up"
            new.shards[sid] = ShardCursor(sc.dispatched, None, sc.attempt, backlog=False)
            continue
        wants.new.append((shard, start, attempt))
    dispatches = _pack(consumer, wants, new, skipped, max_shards_per_run)
    return TickPlan(new, dispatches, skipped)


def _pack(consumer: str, wants: _Wants, cursor: SensorCursor, skipped: dict[str, str],
          max_shards_per_run: int) -> list[Dispatch]:
    """Runs for the shards that want one: a successor per owner run (its shards, plus shards that need a run
    while it has room: a new shard joins a run that is starting anyway), then new runs of up to
    ``max_shards_per_run`` shards each. Writes each member's cursor entry."""
    dispatches: list[Dispatch] = []
    fresh = list(wants.new)
    for owner, owned in wants.successors.items():
        # An owner holding more than max_shards_per_run (the setting was lowered) hands its shards to several
        # successors: rebalancing is a hand-off like any other, shard by shard.
        for members in (owned[i:i + max_shards_per_run] for i in range(0, len(owned), max_shards_per_run)):
            joining = []
            while fresh and len(members) + len(joining) < max_shards_per_run:
                joining.append(fresh.pop(0))
            first, start, number = members[0]
            all_members = [(s, a) for s, a, _ in members] + [(s, a) for s, a, _ in joining]
            key = (make_successor_key(consumer, first, start, owner, number) if len(all_members) == 1 else
                   f"{make_group_key(consumer, [(s, a, 0) for s, a in all_members])}:from-{_digest(owner)}:{number}")
            dispatches.append(Dispatch(first, start, key, 0, successor_of=owner, more=tuple(all_members[1:])))
            for shard, _, _ in members:
                sid = shard_id(shard)
                skipped[sid] = f"run {owner} in flight; dispatched {key} to take over by hand-off"
                sc = cursor.shards[sid]
                cursor.shards[sid] = ShardCursor(sc.dispatched, sc.run_key, sc.attempt, True, key)
            for shard, start_after, attempt in joining:
                cursor.shards[shard_id(shard)] = ShardCursor(dispatched=start_after, run_key=key, attempt=attempt,
                                                             backlog=True)
    for i in range(0, len(fresh), max_shards_per_run):
        group = fresh[i:i + max_shards_per_run]
        shard, start, attempt = group[0]
        key = make_run_key(consumer, shard, start, attempt) if len(group) == 1 else make_group_key(consumer, group)
        dispatches.append(Dispatch(shard, start, key, max(a for _, _, a in group),
                                   more=tuple((s, a) for s, a, _ in group[1:])))
        for member, start_after, member_attempt in group:
            cursor.shards[shard_id(member)] = ShardCursor(dispatched=start_after, run_key=key,
                                                          attempt=member_attempt, backlog=True)
    return dispatches


def _successor_number(sc: ShardCursor) -> int:
    """The next successor's number for this owner: one more than the last one dispatched for it."""
    mark = f":from-{_digest(sc.run_key or '')}:"
    if sc.successor_key and mark in sc.successor_key:
        return int(sc.successor_key.rsplit(":", 1)[1]) + 1
    return 0
