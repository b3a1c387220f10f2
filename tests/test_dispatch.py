"""The sensor's per-tick decision (pure): one in-flight run per shard, dedup keys, re-dispatch."""

from __future__ import annotations

from durability_pipelines.checkpoints.keys import NO_SHARD, shard_from_tag, shard_to_tag
from durability_pipelines.consumer.dispatch import (
    DEAD_RUN_GRACE_S,
    InFlightRun,
    LeaseView,
    RunState,
    SensorCursor,
    ShardCursor,
    dead_run_reason,
    make_run_key,
    plan_tick,
)


def plan(cursor: SensorCursor, acked: dict, states: dict | None = None, *, new=True, blocked=frozenset(),
         shards=None, max_dispatches=100, due=frozenset(), per_run=1):
    states = states or {}
    return plan_tick(
        "c", cursor, shards=shards or list(acked), acked=acked, has_new=lambda s, a: new,
        run_state=lambda k, _shard: states.get(k, RunState.MISSING), blocked=set(blocked),
        max_dispatches=max_dispatches, successor_due=lambda k, _shard: k in due, max_shards_per_run=per_run,
    )


def test_first_tick_dispatches_every_shard_with_new_data() -> None:
    p = plan(SensorCursor(), {"s1": None, "s2": "100"})
    assert [d.run_key for d in p.dispatches] == ["c:s1:INITIAL:a0", "c:s2:100:a0"]
    assert p.cursor.shards["s2"] == ShardCursor(dispatched="100", run_key="c:s2:100:a0", attempt=0, backlog=True)


def test_in_flight_shard_is_not_dispatched_again() -> None:
    first = plan(SensorCursor(), {"s1": "100"})
    again = plan(first.cursor, {"s1": "100"}, {"c:s1:100:a0": RunState.IN_PROGRESS})
    assert again.dispatches == [] and "in flight" in again.skipped["s1"]


def test_repeated_tick_regenerates_the_same_run_key() -> None:
    """A tick that failed does not advance the cursor: the retry yields the same key (Dagster dedups)."""
    a = plan(SensorCursor(), {"s1": "100"})
    b = plan(SensorCursor(), {"s1": "100"})
    assert a.dispatches == b.dispatches


def test_success_with_progress_dispatches_from_the_new_acked_checkpoint() -> None:
    first = plan(SensorCursor(), {"s1": "100"})
    nxt = plan(first.cursor, {"s1": "250"}, {"c:s1:100:a0": RunState.SUCCESS})
    assert [d.run_key for d in nxt.dispatches] == ["c:s1:250:a0"]


def test_failed_run_is_redispatched_from_acked_with_an_attempt_suffix() -> None:
    first = plan(SensorCursor(), {"s1": "100"})
    retry = plan(first.cursor, {"s1": "100"}, {"c:s1:100:a0": RunState.FAILURE})
    assert [d.run_key for d in retry.dispatches] == ["c:s1:100:a1"]
    again = plan(retry.cursor, {"s1": "100"}, {"c:s1:100:a1": RunState.FAILURE})
    assert [d.run_key for d in again.dispatches] == ["c:s1:100:a2"]


def test_run_that_never_launched_is_redispatched() -> None:
    first = plan(SensorCursor(), {"s1": "100"})
    retry = plan(first.cursor, {"s1": "100"}, {})  # MISSING
    assert [d.run_key for d in retry.dispatches] == ["c:s1:100:a1"]


def test_blocked_shard_is_not_dispatched() -> None:
    p = plan(SensorCursor(), {"s1": "100", "s2": "5"}, blocked={"s1"})
    assert [d.shard for d in p.dispatches] == ["s2"] and "dead letter" in p.skipped["s1"]


def test_caught_up_shard_is_skipped() -> None:
    p = plan(SensorCursor(), {"s1": "100"}, new=False)
    assert p.dispatches == [] and p.skipped["s1"] == "caught up"
    assert p.cursor.shards["s1"].backlog is False


def test_dispatch_budget_per_tick() -> None:
    p = plan(SensorCursor(), {f"s{i}": None for i in range(5)}, max_dispatches=2)
    assert len(p.dispatches) == 2 and "budget" in p.skipped["s4"]


def test_unsharded_stream_key_and_cursor_round_trip() -> None:
    p = plan(SensorCursor(), {None: "42"})
    assert p.dispatches[0].run_key == make_run_key("c", None, "42", 0) == "c:-:42:a0"
    assert SensorCursor.from_json(p.cursor.to_json()) == p.cursor


def test_garbage_cursor_is_rebuilt_not_fatal() -> None:
    for raw in ("{not json", '{"shards": {"s": {"bogus": 1}}}', "[]", '"x"'):
        assert SensorCursor.from_json(raw) == SensorCursor()


# -- telling a dead run from a live one (the lease is its heartbeat) ---------------------------------

LEASE_S, BUDGET_S, NOW = 120.0, 65.0, 10_000.0


def dead(status: str = "STARTED", started: float | None = NOW - 30, owner: str = "run-1",
         expires: float | None = NOW + 60) -> str | None:
    lease = LeaseView(owner, expires) if expires is not None else None
    return dead_run_reason(InFlightRun("run-1", status, started), lease, now=NOW, lease_duration_s=LEASE_S,
                           run_budget_s=BUDGET_S)


def test_a_run_renewing_its_lease_is_alive() -> None:
    assert dead() is None
    assert dead(started=NOW - 10_000) is None  # old, but it holds a live lease: a long run, still renewing


def test_a_run_whose_lease_expired_is_dead_whatever_happened_to_its_node() -> None:
    assert dead(expires=NOW - DEAD_RUN_GRACE_S + 1) is None  # within the grace for clock differences
    reason = dead(expires=NOW - 60)
    assert reason and "expired 60 s ago" in reason and "run-1" in reason


def test_a_run_that_never_took_the_lease_is_dead_once_no_live_run_could_be_that_old() -> None:
    assert dead(owner="", started=NOW - 100) is None  # it may still be starting up
    assert dead(owner="other-run", started=NOW - (BUDGET_S + LEASE_S + DEAD_RUN_GRACE_S) + 5) is None
    reason = dead(owner="", expires=NOW - 500, started=NOW - 400)
    assert reason and "without holding the shard's lease" in reason


def test_queued_and_not_yet_started_runs_are_never_dead() -> None:
    assert dead(status="QUEUED", expires=NOW - 600, started=NOW - 900) is None
    assert dead(status="STARTED", started=None, expires=NOW - 600) is None


def test_no_shard_is_one_spelling_in_cursor_run_key_and_tag_and_reads_back_as_none() -> None:
    p = plan(SensorCursor(), {None: "100"})
    assert NO_SHARD == "-" and list(p.cursor.shards) == ["-"] and p.dispatches[0].run_key == "c:-:100:a0"
    assert shard_to_tag(None) == "-" and shard_to_tag("s1") == "s1"
    assert [shard_from_tag(t) for t in ("-", "", "s1")] == [None, None, "s1"]  # '' = older runs' run config


# -- graceful hand-off: a successor is started before the owner's budget ends ------------------------

def test_a_run_due_to_be_replaced_gets_one_successor_beside_it() -> None:
    first = plan(SensorCursor(), {"s1": "100"})
    owner = "c:s1:100:a0"
    early = plan(first.cursor, {"s1": "300"}, {owner: RunState.IN_PROGRESS})
    assert early.dispatches == []  # not due yet
    due = plan(early.cursor, {"s1": "300"}, {owner: RunState.IN_PROGRESS}, due={owner})
    (successor,) = due.dispatches
    assert successor.successor_of == owner and successor.shard == "s1"
    assert due.cursor.shards["s1"].run_key == owner and due.cursor.shards["s1"].successor_key == successor.run_key
    waiting = plan(due.cursor, {"s1": "400"}, {owner: RunState.IN_PROGRESS, successor.run_key: RunState.IN_PROGRESS},
                   due={owner})
    assert waiting.dispatches == [] and "waiting to take over" in waiting.skipped["s1"]  # one successor at a time


def test_when_the_owner_ends_its_successor_becomes_the_shards_run() -> None:
    first = plan(SensorCursor(), {"s1": "100"})
    owner = "c:s1:100:a0"
    due = plan(first.cursor, {"s1": "300"}, {owner: RunState.IN_PROGRESS}, due={owner})
    successor = due.dispatches[0].run_key
    handed = plan(due.cursor, {"s1": "500"}, {owner: RunState.SUCCESS, successor: RunState.IN_PROGRESS})
    assert handed.dispatches == [] and handed.cursor.shards["s1"].run_key == successor
    assert handed.cursor.shards["s1"].successor_key is None
    # and its own successor, once it is due, has a key of bounded length (a digest of the owner's key)
    nxt = plan(handed.cursor, {"s1": "900"}, {successor: RunState.IN_PROGRESS}, due={successor})
    assert len(nxt.dispatches[0].run_key) <= len(successor) + 10 and nxt.dispatches[0].successor_of == successor


def test_a_successor_that_ended_without_the_shard_is_replaced_by_a_new_one_with_a_new_key() -> None:
    first = plan(SensorCursor(), {"s1": "100"})
    owner = "c:s1:100:a0"
    due = plan(first.cursor, {"s1": "100"}, {owner: RunState.IN_PROGRESS}, due={owner})
    gone = due.dispatches[0].run_key
    again = plan(due.cursor, {"s1": "100"}, {owner: RunState.IN_PROGRESS, gone: RunState.SUCCESS}, due={owner})
    (retry,) = again.dispatches
    assert retry.run_key != gone and retry.successor_of == owner  # Dagster never launches a run key twice


def test_a_blocked_shard_gets_no_successor() -> None:
    first = plan(SensorCursor(), {"s1": "100"})
    owner = "c:s1:100:a0"
    p = plan(first.cursor, {"s1": "100"}, {owner: RunState.IN_PROGRESS}, due={owner}, blocked={"s1"})
    assert p.dispatches == []


def test_a_cursor_written_before_hand_offs_still_parses() -> None:
    old = '{"v":1,"stream_identity":null,"shards":{"s1":{"dispatched":"100","run_key":"c:s1:100:a0","attempt":0,' \
          '"backlog":true}}}'
    assert SensorCursor.from_json(old).shards["s1"] == ShardCursor("100", "c:s1:100:a0", 0, True, None)


# -- a run owns several shards (max_shards_per_run) ----------------------------------------------------

def test_shards_that_need_a_run_are_packed_into_runs_of_at_most_max_shards_per_run() -> None:
    acked = {f"s{i}": str(100 + i) for i in range(5)}
    p = plan(SensorCursor(), acked, per_run=2)
    assert [d.shards for d in p.dispatches] == [("s0", "s1"), ("s2", "s3"), ("s4",)]
    assert p.dispatches[0].members == (("s0", "100"), ("s1", "101"))
    assert p.dispatches[2].run_key == make_run_key("c", "s4", "104", 0)  # a run of one keeps its plain key
    for d in p.dispatches:
        for shard, start in d.members:
            assert p.cursor.shards[shard] == ShardCursor(start, d.run_key, 0, True)
    assert plan(SensorCursor(), acked, per_run=2).dispatches == p.dispatches  # a repeated tick: same keys (dedup)
    assert len({d.run_key for d in p.dispatches}) == 3


def test_a_run_of_several_shards_in_flight_holds_them_all_and_a_failed_one_is_redispatched_with_a_new_key() -> None:
    acked = {"s0": "100", "s1": "200"}
    first = plan(SensorCursor(), acked, per_run=4)
    (run,) = first.dispatches
    flying = plan(first.cursor, acked, {run.run_key: RunState.IN_PROGRESS}, per_run=4)
    assert flying.dispatches == [] and all("in flight" in flying.skipped[s] for s in acked)
    retry = plan(first.cursor, acked, {run.run_key: RunState.FAILURE}, per_run=4)
    (again,) = retry.dispatches
    assert again.shards == ("s0", "s1") and again.run_key != run.run_key and again.attempt == 1


def test_a_run_of_several_shards_gets_one_successor_for_all_of_them_and_a_new_shard_joins_it() -> None:
    acked = {"s0": "100", "s1": "200"}
    first = plan(SensorCursor(), acked, per_run=3)
    owner = first.dispatches[0].run_key
    grown = {**acked, "s2": "300"}  # a new shard (a split's child) appears while the owner is due to be replaced
    due = plan(first.cursor, grown, {owner: RunState.IN_PROGRESS}, due={owner}, per_run=3)
    (successor,) = due.dispatches
    assert successor.successor_of == owner and successor.shards == ("s0", "s1", "s2")
    assert [due.cursor.shards[s].successor_key for s in ("s0", "s1")] == [successor.run_key] * 2
    assert due.cursor.shards["s2"].run_key == successor.run_key  # the new shard's run is the successor
    handed = plan(due.cursor, grown, {owner: RunState.SUCCESS, successor.run_key: RunState.IN_PROGRESS}, per_run=3)
    assert handed.dispatches == [] and {handed.cursor.shards[s].run_key for s in grown} == {successor.run_key}
    nxt = plan(handed.cursor, grown, {successor.run_key: RunState.IN_PROGRESS}, due={successor.run_key}, per_run=3)
    assert nxt.dispatches[0].successor_of == successor.run_key and len(nxt.dispatches[0].run_key) < 80


def test_the_dispatch_budget_counts_runs_not_shards() -> None:
    acked = {f"s{i}": "1" for i in range(10)}
    p = plan(SensorCursor(), acked, per_run=4, max_dispatches=2)
    assert [len(d.shards) for d in p.dispatches] == [4, 4]
    assert sum("budget" in why for why in p.skipped.values()) == 2


def test_an_owner_holding_more_shards_than_max_shards_per_run_hands_them_to_several_successors() -> None:
    acked = {f"s{i}": str(i) for i in range(6)}
    first = plan(SensorCursor(), acked, per_run=6)
    owner = first.dispatches[0].run_key
    lowered = plan(first.cursor, acked, {owner: RunState.IN_PROGRESS}, due={owner}, per_run=2)
    assert [d.shards for d in lowered.dispatches] == [("s0", "s1"), ("s2", "s3"), ("s4", "s5")]
    assert {d.successor_of for d in lowered.dispatches} == {owner} and len({d.run_key for d in lowered.dispatches}) == 3
    assert [lowered.cursor.shards[f"s{i}"].successor_key for i in range(6)] == [
        d.run_key for d in lowered.dispatches for _ in range(2)]
