"""Issue 21 item 4: a foreign rewind never makes the Realtime broadcaster publish again.

The attack: a worker of the original pattern moves a broadcaster's checkpoint back 40 positions (a plain
``SET key seq EX 86400`` in Redis, the plain UPSERT in Postgres). Before the fix the next run read on from there
and re-sent 40 broadcasts: the runbook called replay safe because "the sinks are idempotent", which a broadcast
is not.

Expected: ``rest_broadcast_handler`` declares itself not idempotent; its consumer does not read below the highest
position the project recorded (the newest own history entry, ``checkpoints/replay.py``): the shard stops with
``ReplayRefusedError``, naming from -> to and the two commands on (``checkpoints rewind ... --reason`` to replay on
purpose, ``checkpoints repair`` to restore), while the other shards go on. After the deliberate rewind the replay
happens, once. An idempotent sink (``stream_events``) replays after the same rewind as before.

Real servers throughout: the shared fixture's Redis and database, the local Realtime server's REST broadcast.
"""

from __future__ import annotations

import secrets
import uuid
from collections import Counter
from collections.abc import Iterator

import psycopg
import pytest

from durability_pipelines import services
from durability_pipelines.checkpoints import CheckpointKey
from durability_pipelines.cli import main
from durability_pipelines.consumer.drain import (
    BatchRecord,
    DrainBudget,
    DrainReport,
    ShardDrainer,
    StopReason,
)
from durability_pipelines.consumer.events import ChangeEvent
from durability_pipelines.consumer.handlers import describe_sink, is_idempotent
from durability_pipelines.consumer.runtime import ConsumerRuntime, ReplayRefusedError, open_runtime
from durability_pipelines.consumer.shard_set import ShardSetDrainer
from durability_pipelines.sinks import postgres_events, realtime
from tests.support.realtime_server import LocalRealtimeServer
from tests.support.shared_layout import Shared
from tests.support.sources import ListSource
from tests.test_consumer_runtime import make_config

BROADCASTER = "durability_pipelines.sinks.realtime:rest_broadcast_handler"
STREAM_EVENTS = "durability_pipelines.sinks.postgres_events:handle"
URL_ENV, KEY_ENV = "REPLAY_TEST_SUPABASE_URL", "REPLAY_TEST_SUPABASE_KEY"
BACKENDS = ["redis", "postgres", "hybrid"]  # memory: no other worker can reach a process-local checkpoint


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalRealtimeServer]:
    with LocalRealtimeServer(api_key=f"test-key-{secrets.token_hex(4)}") as s:
        monkeypatch.setenv(URL_ENV, s.url)
        monkeypatch.setenv(KEY_ENV, s.api_key)
        yield s


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, shared: Shared) -> None:
    """The operator's CLI on the same servers (through the variables operators set)."""
    monkeypatch.setenv(services.ENV_POSTGRES_URL, shared.postgres_url)
    monkeypatch.setenv(services.ENV_REDIS_URL, shared.redis_url)
    monkeypatch.delenv("DURABILITY_CHECKPOINT_BACKEND", raising=False)


def runtime(shared: Shared, source: ListSource, backend: str, handler: str, topic: str = "") -> ConsumerRuntime:
    options = {"topic": topic, "url_env": URL_ENV, "key_env": KEY_ENV} if handler == BROADCASTER else {}
    cfg = make_config(source.stream, backend, handler=handler, handler_options=options,
                      checkpoint={"backend": backend, "flush_every_n": 1})
    return open_runtime(cfg, redis_url=shared.redis_url, postgres_url=shared.postgres_url, source=source)


def drain(rt: ConsumerRuntime, shard: str = "shard-0", **kwargs: object) -> DrainReport:
    run_id = "run-" + uuid.uuid4().hex[:8]
    return ShardDrainer(rt, shard, run_id, DrainBudget(100, 60, 0), prefetch=False, **kwargs).run()  # type: ignore[arg-type]


def sent(server: LocalRealtimeServer, topic: str) -> list[str]:
    return [m["payload"]["sequence"] for m in server.published if m["topic"] == topic]


def other_worker_rewinds(shared: Shared, backend: str, key: CheckpointKey, to: str) -> None:
    """The original pattern's worker moves the checkpoint back where the backend loads it from."""
    if backend in ("redis", "hybrid"):
        shared.other_set(key.redis_key, to)
    if backend in ("postgres", "hybrid"):
        shared.other_upsert(key, to)


def key_parts(key: CheckpointKey) -> list[str]:
    return [key.adapter, key.stream, key.group, key.consumer, *([key.shard] if key.shard else [])]


def broadcast_all_then_rewind(shared: Shared, backend: str, count: int, back_to: int
                              ) -> tuple[str, ListSource, list[ChangeEvent], CheckpointKey]:
    """A broadcaster sends ``count`` events, then the other worker moves its checkpoint back to event ``back_to``."""
    topic = "room-" + uuid.uuid4().hex[:8]
    source = ListSource.with_events("bc-" + uuid.uuid4().hex[:10], count)
    events = source.shards_events["shard-0"]
    rt = runtime(shared, source, backend, BROADCASTER, topic)
    assert drain(rt).stop_reason is StopReason.CAUGHT_UP
    rt.close()
    key = rt.key("shard-0")
    other_worker_rewinds(shared, backend, key, events[back_to].sequence)
    return topic, source, events, key


def test_the_broadcasters_declare_themselves_not_idempotent_and_stream_events_idempotent() -> None:
    assert not is_idempotent(realtime.rest_broadcast_handler) and not is_idempotent(realtime.broadcast_handler)
    assert is_idempotent(postgres_events.handle)
    assert not describe_sink(BROADCASTER, {"topic": "room"}, "orders").idempotent
    assert describe_sink(STREAM_EVENTS, {}, "orders").idempotent


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_foreign_rewind_stops_the_broadcaster_without_republishing_and_names_the_commands(
        shared: Shared, server: LocalRealtimeServer, backend: str) -> None:
    topic, source, events, key = broadcast_all_then_rewind(shared, backend, 60, 19)  # 40 positions back

    rt = runtime(shared, source, backend, BROADCASTER, topic)  # the next run
    with pytest.raises(ReplayRefusedError) as err:
        drain(rt)
    assert sent(server, topic) == [e.sequence for e in events], "a foreign rewind re-sent broadcasts"
    message = str(err.value)
    assert f"moved back from {events[-1].sequence}" in message and f"to {events[19].sequence}" in message
    assert "a write the project did not make" in message
    assert (f"`durability-pipelines checkpoints rewind {' '.join(key_parts(key))} --backend hybrid "
            f"--to {events[19].sequence} --reason '<why>'`") in message
    assert f"`durability-pipelines checkpoints repair {key.redis_key}`" in message
    # the sensor's view of the same shard: stopped with the same words, no dead letter (a rewind or repair lifts it)
    acked, stopped = rt.load_acked(["shard-0"], blocked=set(), run_id="sensor:test")
    assert "checkpoints rewind" in stopped["shard-0"] and acked["shard-0"] == events[19].sequence
    assert rt.storage is not None and rt.storage.blocked_shards(rt.config.name) == set()
    rt.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_after_a_deliberate_rewind_the_broadcaster_replays_once(
        shared: Shared, server: LocalRealtimeServer, cli: None, backend: str) -> None:
    topic, source, events, key = broadcast_all_then_rewind(shared, backend, 60, 19)
    rt = runtime(shared, source, backend, BROADCASTER, topic)
    with pytest.raises(ReplayRefusedError):
        drain(rt)
    rt.close()

    assert main(["checkpoints", "rewind", *key_parts(key), "--backend", "hybrid", "--to", events[19].sequence,
                 "--reason", "INC-7: re-send the 40 broadcasts the subscribers missed", "--by", "oncall"]) == 0

    rt = runtime(shared, source, backend, BROADCASTER, topic)
    assert drain(rt).stop_reason is StopReason.CAUGHT_UP
    assert drain(rt).batches == []  # a second run finds nothing more to send
    rt.close()
    counts = Counter(sent(server, topic))
    assert {s for s, n in counts.items() if n == 2} == {e.sequence for e in events[20:]}
    assert all(counts[e.sequence] == 1 for e in events[:20]) and len(counts) == 60
    assert rt.store.load(key) == events[-1].sequence


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoints_repair_restores_the_broadcaster_without_a_replay(
        shared: Shared, server: LocalRealtimeServer, cli: None, backend: str) -> None:
    topic, source, events, key = broadcast_all_then_rewind(shared, backend, 30, 9)

    assert main(["checkpoints", "repair", key.redis_key, "--by", "oncall"]) == 0

    rt = runtime(shared, source, backend, BROADCASTER, topic)
    source.shards_events["shard-0"] = events = [*events, *ListSource.with_events(source.stream, 5,
                                                                                 start=int(events[-1].sequence) + 1)
                                                .shards_events["shard-0"]]
    report = drain(rt)
    rt.close()
    assert report.stop_reason is StopReason.CAUGHT_UP and report.start_after == events[29].sequence
    assert sent(server, topic) == [e.sequence for e in events]  # the 5 new ones, nothing twice


def test_a_rewind_seen_by_a_save_mid_run_stops_the_broadcaster_before_it_resends(
        shared: Shared, server: LocalRealtimeServer, cli: None) -> None:
    topic = "room-" + uuid.uuid4().hex[:8]
    source = ListSource.with_events("bc-" + uuid.uuid4().hex[:10], 60)
    events = source.shards_events["shard-0"]
    rt = runtime(shared, source, "redis", BROADCASTER, topic)
    key = rt.key("shard-0")

    def rewind_after_batch_three(record: BatchRecord) -> None:
        if record.index == 3:  # acked up to events[29]
            shared.other_set(key.redis_key, events[9].sequence)

    # the fourth batch (events 30-39) goes out; its ack finds the rewind, writes nothing over it, and stops
    with pytest.raises(ReplayRefusedError) as err:
        drain(rt, on_batch=rewind_after_batch_three)
    rt.close()
    assert sent(server, topic) == [e.sequence for e in events[:40]]  # nothing twice
    message = str(err.value)
    assert f"moved back from {events[29].sequence}" in message and f"to {events[9].sequence}" in message
    assert f"foreign write seen by a save in redis: moved back from {events[29].sequence}" in message
    restore = f"checkpoints set {' '.join(key_parts(key))} --backend hybrid --sequence {events[39].sequence}"
    assert f"The batch in hand (up to {events[39].sequence}) was published" in message and restore in message
    assert shared.client.get(key.redis_key) == events[9].sequence.encode()  # the other worker's value, kept

    assert main([*restore.split(), "--reason", "keep what was sent"]) == 0  # the command as the message gives it
    rt = runtime(shared, source, "redis", BROADCASTER, topic)
    assert drain(rt).start_after == events[39].sequence
    rt.close()
    assert sent(server, topic) == [e.sequence for e in events]  # the rest, once


def test_one_rewound_shard_stops_alone(shared: Shared, server: LocalRealtimeServer) -> None:
    topic = "room-" + uuid.uuid4().hex[:8]
    stream = "bc-" + uuid.uuid4().hex[:10]
    source = ListSource(stream, {**ListSource.with_events(stream, 20, "shard-0").shards_events,
                                 **ListSource.with_events(stream, 20, "shard-1", start=10**22).shards_events})
    rt = runtime(shared, source, "postgres", BROADCASTER, topic)
    for shard in ("shard-0", "shard-1"):
        drain(rt, shard)
    rt.close()
    first = source.shards_events["shard-0"]
    shared.other_upsert(rt.key("shard-0"), first[4].sequence)
    more = ListSource.with_events(stream, 5, "shard-1", start=10**22 + 1000).shards_events["shard-1"]
    source.shards_events["shard-1"].extend(more)

    rt = runtime(shared, source, "postgres", BROADCASTER, topic)
    acked, stopped = rt.load_acked(["shard-0", "shard-1"], blocked=set(), run_id="sensor:test")
    assert list(stopped) == ["shard-0"] and acked["shard-1"] == source.shards_events["shard-1"][19].sequence
    outcomes = {o.shard: o for o in ShardSetDrainer(rt, ["shard-0", "shard-1"], "run-both", DrainBudget(100, 60, 0)).run()}
    rt.close()
    assert isinstance(outcomes["shard-0"].error, ReplayRefusedError)
    assert outcomes["shard-1"].error is None and outcomes["shard-1"].report.checkpoint == more[-1].sequence
    assert Counter(sent(server, topic)).most_common(1)[0][1] == 1  # nothing sent twice, the 5 new ones sent


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_idempotent_sink_replays_after_the_same_foreign_rewind(shared: Shared, backend: str) -> None:
    source = ListSource.with_events("se-" + uuid.uuid4().hex[:10], 60)
    events = source.shards_events["shard-0"]
    rt = runtime(shared, source, backend, STREAM_EVENTS)
    drain(rt)
    rt.close()
    key = rt.key("shard-0")
    other_worker_rewinds(shared, backend, key, events[19].sequence)

    rt = runtime(shared, source, backend, STREAM_EVENTS)
    report = drain(rt)
    rt.close()
    assert report.stop_reason is StopReason.CAUGHT_UP and report.start_after == events[19].sequence
    # replayed, as before (on redis/hybrid the first ack also finds the rewind and honours it: one batch more)
    assert sum(b.events for b in report.batches) >= 40
    with psycopg.connect(shared.postgres_url) as conn:
        (rows,) = conn.execute("SELECT count(*) FROM stream_events WHERE stream = %s", (source.stream,)).fetchone()
    assert rows == 60 and rt.store.load(key) == events[-1].sequence  # keyed by sequence: no duplicate
