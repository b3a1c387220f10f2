"""Event filters: only matching events reach the handler; the others are acked past and counted
(real Redis/Postgres stores, an in-memory source, a fake clock)."""

from __future__ import annotations

import uuid
from decimal import Decimal
from pathlib import Path

import pytest

from durability_pipelines.checkpoints import ConfigError
from durability_pipelines.consumer.config import EventFilterConfig, load_consumer_config
from durability_pipelines.consumer.events import ChangeEvent
from durability_pipelines.consumer.filters import count_filtered, matches, matching
from durability_pipelines.consumer.runtime import BatchDeadLettered, PartialBatchFailure, open_runtime
from durability_pipelines.observability import EVENTS_FILTERED, Labels, Metrics, read_jsonl
from tests.support.runtime_handlers import DELIVERED
from tests.support.sources import ListSource
from tests.test_consumer_config import instance
from tests.test_consumer_drain import SHARD, FakeClock, drainer, history
from tests.test_consumer_runtime import make_config, rows

DYNAMODB = """
name: t_filtered
source: {kind: dynamodb, table: orders}
group: workers
consumer: consumer-a
"""
SUPABASE = """
name: t_filtered
source: {kind: supabase, channel: orders-changes, table: public.orders}
group: workers
consumer: consumer-a
"""
STATUSES = ("placed", "paid", "cancelled", "draft")


def event(stream: str, i: int, name: str = "INSERT", image: dict | None = None,
          keys: dict | None = None) -> ChangeEvent:
    image = None if name == "REMOVE" else (image if image is not None else {"pk": f"k{i}"})
    return ChangeEvent("dynamodb", stream, SHARD, str(10**21 + i * 17), name, keys or {"pk": f"k{i}"}, image)


def mixed(stream: str, count: int) -> list[ChangeEvent]:
    """INSERT / MODIFY / REMOVE in turn, statuses in turn (REMOVE has no new image)."""
    names = ("INSERT", "MODIFY", "REMOVE")
    return [event(stream, i, names[i % 3], {"pk": f"k{i}", "status": STATUSES[i % 4]}) for i in range(count)]


def wanted(i: int) -> bool:
    """What the filter below selects, written out independently of the matcher."""
    return i % 3 in (0, 1) and STATUSES[i % 4] in ("placed", "paid")


FILTER = {"event_names": ["INSERT", "MODIFY"], "new_image": {"status": ["placed", "paid"]}}


def recording_config(stream: str, backend: str, flag: str, **overrides: object):
    return make_config(stream, backend, handler="tests.support.runtime_handlers:recording",
                       handler_options={"flag": flag, "mode": "report"}, **overrides)


# -- configuration ---------------------------------------------------------------------------------

def test_valid_filters_load_with_scalars_as_one_value_lists(tmp_path: Path) -> None:
    path = instance(tmp_path, "f", DYNAMODB + "filter:\n  event_names: [INSERT, MODIFY]\n  keys: {pk: order-1}\n"
                    "  new_image: {status: [placed, paid], total: 5, gift: true, note: null}\n")
    flt = load_consumer_config(path).filter
    assert flt is not None and flt.event_names == ("INSERT", "MODIFY")
    assert flt.keys == {"pk": ("order-1",)}
    assert flt.new_image == {"status": ("placed", "paid"), "total": (5,), "gift": (True,), "note": (None,)}
    path = instance(tmp_path, "f", SUPABASE + "filter: {event_names: [UPDATE, DELETE]}\n")
    assert load_consumer_config(path).filter.event_names == ("UPDATE", "DELETE")
    path = instance(tmp_path, "f", DYNAMODB)
    assert load_consumer_config(path).filter is None


@pytest.mark.parametrize(
    "text,field,hint",
    [
        (DYNAMODB + "filter: {event_names: [INSERT, UPDATE]}\n", "filter.event_names", "INSERT, MODIFY or REMOVE"),
        (SUPABASE + "filter: {event_names: [MODIFY]}\n", "filter.event_names", "INSERT, UPDATE or DELETE"),
        (DYNAMODB + "filter: {event_names: [insert]}\n", "filter.event_names", "upper case"),
        (DYNAMODB + "filter: {event_name: [INSERT]}\n", "filter.event_name", "Extra inputs"),
        (DYNAMODB + "filter: {new_images: {status: paid}}\n", "filter.new_images", "Extra inputs"),
        (DYNAMODB + "filter: {event_names: INSERT}\n", "filter.event_names", "must be a list"),
        (DYNAMODB + "filter: {event_names: []}\n", "filter.event_names", "at least 1"),
        (DYNAMODB + "filter: {keys: [pk]}\n", "filter.keys", "valid dictionary"),
        (DYNAMODB + "filter: [INSERT]\n", "filter", "valid dictionary"),
        (DYNAMODB + "filter: {new_image: {status: [{prefix: pl}]}}\n", "filter.new_image.status", "prefix"),
        (DYNAMODB + "filter: {new_image: {total: {numeric: ['>', 5]}}}\n", "filter.new_image.total", "not supported"),
        (DYNAMODB + "filter: {new_image: {status: []}}\n", "filter.new_image.status", "matches nothing"),
    ],
)
def test_a_malformed_filter_fails_loading_naming_the_file_and_the_field(tmp_path: Path, text: str, field: str,
                                                                      hint: str) -> None:
    path = instance(tmp_path, "bad_filter", text)
    with pytest.raises(ConfigError) as err:
        load_consumer_config(path)
    message = str(err.value)
    assert str(path) in message and f": attributes.{field}: " in message and hint in message


def test_a_malformed_filter_fails_definition_loading(tmp_path: Path) -> None:
    from durability_pipelines.definitions import build_definitions

    instance(tmp_path, "broken_filter", DYNAMODB + "filter: {event_names: [DELETE]}\n")
    with pytest.raises(ConfigError, match=r"broken_filter/defs\.yaml(.|\n)*attributes\.filter\.event_names"):
        build_definitions(tmp_path, strict=True)  # as under dg check defs


# -- matching --------------------------------------------------------------------------------------

def test_an_event_passes_when_it_matches_every_part_and_any_value_of_a_list() -> None:
    flt = EventFilterConfig(event_names=("INSERT", "MODIFY"), keys={"pk": ("a", "b")},
                            new_image={"status": ("placed", "paid")})
    ok = event("s", 1, "MODIFY", {"status": "paid"}, keys={"pk": "b", "sk": 1})
    assert matches(flt, ok)
    assert not matches(flt, event("s", 1, "REMOVE", keys={"pk": "b"}))  # wrong name (and no new image)
    assert not matches(flt, event("s", 1, "INSERT", {"status": "paid"}, keys={"pk": "c"}))  # key not in the list
    assert not matches(flt, event("s", 1, "INSERT", {"status": "draft"}, keys={"pk": "a"}))  # image not in it
    assert not matches(flt, event("s", 1, "INSERT", {"other": "paid"}, keys={"pk": "a"}))  # attribute missing
    only_names = EventFilterConfig(event_names=("REMOVE",))
    assert matches(only_names, event("s", 1, "REMOVE")) and not matches(only_names, event("s", 1, "INSERT"))
    assert matches(EventFilterConfig(), event("s", 1, "REMOVE"))  # an empty filter passes everything
    events = [event("s", i) for i in range(3)]
    assert matching(None, events) == events and count_filtered(None, events) == 0  # no filter: all pass


def test_values_are_compared_exactly_without_python_coercions() -> None:
    def passes(expected: object, actual: object) -> bool:
        flt = EventFilterConfig.model_validate({"new_image": {"v": expected}})
        return matches(flt, event("s", 1, "INSERT", {"v": actual}))

    assert passes(5, Decimal("5")) and passes(19.99, Decimal("19.99")) and passes(0.1, 0.1)  # by value
    assert passes(5, 5.0) and not passes(5, Decimal("5.5"))
    assert not passes(5, "5") and not passes("5", 5)  # strings are not numbers
    assert passes(True, True) and not passes(1, True) and not passes(True, 1)  # booleans are not numbers
    assert passes(None, None) and not passes(None, "") and not passes("x", None)
    assert not passes("a", ["a"]) and not passes("a", {"a"}) and not passes("a", {"a": 1})  # top level only
    absent = EventFilterConfig.model_validate({"new_image": {"v": None}})
    assert not matches(absent, event("s", 1, "INSERT", {}))  # null matches a null attribute, not a missing one


# -- the runtime: deliver the matching, ack the rest -----------------------------------------------

@pytest.mark.parametrize("backend", ["redis", "postgres", "hybrid"])
def test_a_filtered_stream_delivers_only_matching_events_and_acks_past_the_rest(
        backend, redis_url, postgres_url, tmp_path: Path) -> None:
    stream, flag = "filt-" + uuid.uuid4().hex[:10], uuid.uuid4().hex
    events = mixed(stream, 23)  # batches of 10: 0-9, 10-19, 20-22; events 19 and 22 are filtered out
    assert not wanted(19) and not wanted(22)
    source = ListSource(stream, {SHARD: events})
    jsonl = tmp_path / "metrics.jsonl"
    metrics = Metrics(Labels("dynamodb", stream, "g", "c"), jsonl_path=str(jsonl))
    rt = open_runtime(recording_config(stream, backend, flag, filter=FILTER), redis_url=redis_url,
                      postgres_url=postgres_url, source=source, metrics=metrics)
    records = []
    report = drainer(rt, FakeClock(), on_batch=records.append).run()

    batches = [range(0, 10), range(10, 20), range(20, 23)]
    expected = [[events[i].sequence for i in b if wanted(i)] for b in batches]
    assert DELIVERED[flag] == expected  # one handler call per batch, matching events only, in order
    assert rows(postgres_url, stream) == [s for call in expected for s in call]
    # the checkpoint passes the filtered events: each batch is acked at its last event, matching or not
    assert [r.checkpoint for r in records] == [events[b[-1]].sequence for b in batches]
    assert rt.store.load(rt.key(SHARD)) == events[22].sequence
    filtered = [sum(1 for i in b if not wanted(i)) for b in batches]
    assert [r.filtered for r in records] == filtered and [r.processed for r in records] == [len(c) for c in expected]
    assert [r.as_dict()["filtered"] for r in records] == filtered
    assert f"10 events ({events[0].sequence}..{events[9].sequence}), {filtered[0]} filtered out;" in (
        records[0].describe())
    meta = report.as_metadata()
    assert (meta["events"], meta["processed"], meta["events_filtered"], meta["failed_items"]) == (
        23, sum(len(c) for c in expected), sum(filtered), 0)
    lines = [r for r in read_jsonl(jsonl) if r["metric"] == EVENTS_FILTERED]
    assert [r["value"] for r in lines] == filtered  # one per batch, beside reactive.events_per_batch
    per_batch = next(r for r in read_jsonl(jsonl) if r["metric"] == "reactive.events_per_batch")
    assert all(r["labels"] == per_batch["labels"] for r in lines)
    assert lines[0]["labels"] == {"adapter": "dynamodb", "stream": stream, "group": "g", "consumer": "c",
                                  "shard": SHARD}
    rt.close()


@pytest.mark.parametrize("backend", ["redis", "postgres"])
def test_a_stream_of_only_filtered_events_advances_the_checkpoint_and_never_calls_the_handler(
        backend, redis_url, postgres_url) -> None:
    stream, flag = "filt-" + uuid.uuid4().hex[:10], uuid.uuid4().hex
    events = [event(stream, i, "REMOVE") for i in range(25)]
    rt = open_runtime(recording_config(stream, backend, flag, filter={"event_names": ["INSERT"]}),
                      redis_url=redis_url, postgres_url=postgres_url, source=ListSource(stream, {SHARD: events}))
    report = drainer(rt, FakeClock()).run()
    assert flag not in DELIVERED and rows(postgres_url, stream) == []
    assert [b.filtered for b in report.batches] == [10, 10, 5] and report.processed == 0
    assert history(rt) == [(None, events[9].sequence), (events[9].sequence, events[19].sequence),
                           (events[19].sequence, events[24].sequence)]
    assert report.checkpoint == events[24].sequence and report.as_metadata()["events_filtered"] == 25
    again = drainer(rt, FakeClock()).run()  # nothing is delivered twice either
    assert again.events == 0 and again.start_after == events[24].sequence
    rt.close()


def kinds_with_poison(stream: str) -> list[ChangeEvent]:
    """Even events are orders (kept), odd ones notes (filtered); 6 (an order) and 3 (a note) are poison."""
    return [event(stream, i, "INSERT", {"kind": "order" if i % 2 == 0 else "note", "poison": i in (3, 6)})
            for i in range(10)]


@pytest.mark.parametrize("backend", ["hybrid", "postgres"])
def test_partial_failure_with_a_filter_checkpoints_just_before_the_lowest_failed_matching_event(
        backend, redis_url, postgres_url) -> None:
    stream, flag = "filt-" + uuid.uuid4().hex[:10], uuid.uuid4().hex
    ev = kinds_with_poison(stream)
    cfg = recording_config(stream, backend, flag, filter={"new_image": {"kind": "order"}}, retry={"max_retries": 1})
    rt = open_runtime(cfg, redis_url=redis_url, postgres_url=postgres_url, source=ListSource(stream, {SHARD: ev}))
    read = rt.read(SHARD, "run-1")
    with pytest.raises(PartialBatchFailure, match="3 events"):
        rt.process(read, retry_number=0)
    assert DELIVERED[flag] == [[ev[i].sequence for i in (0, 2, 4, 6, 8)]]  # the poison note 3 never got there
    # just before event 6: event 5, a filtered note, is done too
    assert rt.store.load(rt.key(SHARD)) == ev[5].sequence
    assert rows(postgres_url, stream) == [ev[i].sequence for i in (0, 2, 4)]
    with pytest.raises(BatchDeadLettered):  # the retry sees only the matching events after the checkpoint
        rt.process(read, retry_number=1)
    assert DELIVERED[flag][1] == [ev[6].sequence, ev[8].sequence]
    (dl,) = rt.storage.dead_letters(cfg.name)
    assert (dl.first_sequence, dl.last_sequence, dl.record_count) == (ev[6].sequence, ev[8].sequence, 2)
    assert rt.store.load(rt.key(SHARD)) == ev[5].sequence  # a dead-lettered batch is never skipped
    rt.close()


def test_bisect_with_a_filter_dead_letters_only_the_poison_matching_event_and_acks_the_batch(
        redis_url, postgres_url) -> None:
    stream, flag = "filt-" + uuid.uuid4().hex[:10], uuid.uuid4().hex
    ev = kinds_with_poison(stream)
    cfg = recording_config(stream, "hybrid", flag, filter={"new_image": {"kind": "order"}},
                           retry={"max_retries": 0}, dead_letter={"policy": "bisect"})
    rt = open_runtime(cfg, redis_url=redis_url, postgres_url=postgres_url, source=ListSource(stream, {SHARD: ev}))
    report = drainer(rt, FakeClock()).run()
    (record,) = report.batches
    assert (record.processed, record.failed, record.filtered) == (4, 1, 5)
    assert record.checkpoint == ev[9].sequence  # past the trailing filtered note
    assert rows(postgres_url, stream) == [ev[i].sequence for i in (0, 2, 4, 8)]
    assert all(ev[i].sequence not in call for call in DELIVERED[flag] for i in range(1, 10, 2))
    (dl,) = rt.storage.dead_letters(cfg.name)
    assert (dl.first_sequence, dl.record_count, dl.policy) == (ev[6].sequence, 1, "bisect")
    rt.close()
