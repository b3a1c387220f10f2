"""Event filters: which changes of a batch reach the handler (a consumer's ``filter``).

Why here and not in the handler: a filtered-out event must still be *acked*, so the runtime, which owns
the checkpoint, decides. ``ConsumerRuntime.process`` hands the handler only the matching events; the
checkpoint still moves over the whole batch (``SourceBatch.next_checkpoint``, ``checkpoint_before``), so
a stream of filtered events never stalls a shard, and a partial failure checkpoints just before the
lowest failed *matching* event, filtered events before it included.

The patterns are a subset of Lambda's filter criteria (``{"eventName": [...], "dynamodb": {"Keys": {...},
"NewImage": {...}}}``): exact equality with a value, or any of a list of values, on top-level attributes;
no prefix / numeric / exists / anything-but operators, no nested attributes. No Dagster import.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from durability_pipelines.consumer.config import EventFilterConfig, FilterScalar
from durability_pipelines.consumer.events import ChangeEvent

_MISSING = object()


def _number(value: int | float | Decimal) -> Decimal:
    """Numbers compared by value: DynamoDB images hold ``Decimal``, YAML and JSON ``int`` / ``float``
    (``repr`` keeps ``0.1`` as written instead of its binary expansion)."""
    if isinstance(value, Decimal):
        return value
    return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)


def value_matches(actual: Any, expected: FilterScalar) -> bool:
    """Equality without Python's coercions: ``True`` is not ``1``, ``"5"`` is not ``5``, null only matches
    an attribute that is present and null; containers (maps, lists, sets) never match."""
    if expected is None or isinstance(expected, bool) or isinstance(actual, bool):
        return actual is expected
    if isinstance(expected, str) or isinstance(actual, str):
        return isinstance(actual, str) and actual == expected
    if isinstance(actual, int | float | Decimal):
        return _number(actual) == _number(expected)
    return False


def _attributes_match(attributes: Mapping[str, Any] | None,
                      wanted: Mapping[str, tuple[FilterScalar, ...]]) -> bool:
    if not wanted:
        return True
    if attributes is None:  # e.g. no new image on a REMOVE / DELETE
        return False
    for name, values in wanted.items():
        actual = attributes.get(name, _MISSING)
        if actual is _MISSING or not any(value_matches(actual, v) for v in values):
            return False
    return True


def matches(flt: EventFilterConfig | None, event: ChangeEvent) -> bool:
    """Does ``event`` pass? AND across the parts given, OR within a list; no filter passes everything."""
    if flt is None:
        return True
    if flt.event_names is not None and event.event_name not in flt.event_names:
        return False
    return _attributes_match(event.keys, flt.keys) and _attributes_match(event.new_image, flt.new_image)


def matching(flt: EventFilterConfig | None, events: Sequence[ChangeEvent]) -> list[ChangeEvent]:
    """The events that reach the handler, in stream order."""
    if flt is None:
        return list(events)
    return [e for e in events if matches(flt, e)]


def count_filtered(flt: EventFilterConfig | None, events: Sequence[ChangeEvent]) -> int:
    """How many of ``events`` the filter keeps from the handler (acked all the same)."""
    if flt is None:
        return 0
    return sum(1 for e in events if not matches(flt, e))
