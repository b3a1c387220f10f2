"""Handlers used by the runtime tests (importable by dotted path)."""

from __future__ import annotations

from collections.abc import Sequence

from durability_pipelines.consumer.events import ChangeEvent
from durability_pipelines.consumer.handlers import HandlerContext, HandlerResult, transactional
from durability_pipelines.sinks.postgres_events import write_events


@transactional
def poison_aware(events: Sequence[ChangeEvent], ctx: HandlerContext) -> HandlerResult | None:
    """Writes events to stream_events, except those whose new_image has poison=True.

    options: ``mode`` = 'raise' (fail the whole batch when a poison event is in it) or
    'report' (report the poison events as failed items).
    """
    assert ctx.connection is not None
    poison = [e.sequence for e in events if (e.new_image or {}).get("poison")]
    if poison and ctx.options.get("mode", "raise") == "raise":
        raise ValueError(f"poison record(s) {poison}")
    good = [e for e in events if e.sequence not in poison]
    if poison:
        # partial failure: only what precedes the first failed item may be kept
        first = min(int(p) for p in poison)
        good = [e for e in good if int(e.sequence) < first]
    write_events(ctx.connection, good, ctx.consumer)
    return HandlerResult(failed_sequences=poison)




@transactional
def crash_after_write(events: Sequence[ChangeEvent], ctx: HandlerContext) -> None:
    assert ctx.connection is not None
    write_events(ctx.connection, events, ctx.consumer)
    raise RuntimeError("crashed after writing, before the commit")




def report_poison(events: Sequence[ChangeEvent], ctx: HandlerContext) -> HandlerResult | None:
    """Non-transactional: records nothing itself, reports events with poison=True as failed."""
    return HandlerResult(failed_sequences=[e.sequence for e in events if (e.new_image or {}).get("poison")])


_CALLS: dict[str, int] = {}


@transactional
def fail_first_call(events: Sequence[ChangeEvent], ctx: HandlerContext) -> None:
    """Fails the first call per ``options.flag`` (in this process), then writes like the default sink."""
    flag = str(ctx.options["flag"])
    _CALLS[flag] = _CALLS.get(flag, 0) + 1
    if _CALLS[flag] == 1:
        raise RuntimeError("first call fails")
    assert ctx.connection is not None
    write_events(ctx.connection, events, ctx.consumer)




#: ``recording``'s calls: options.flag -> the sequences of each call, in order.
DELIVERED: dict[str, list[list[str]]] = {}


@transactional
def recording(events: Sequence[ChangeEvent], ctx: HandlerContext) -> HandlerResult | None:
    """Records what each call received (under ``options.flag``), then does what ``poison_aware`` does
    with the same options: the tests see both what reached the handler and what it wrote."""
    DELIVERED.setdefault(str(ctx.options["flag"]), []).append([e.sequence for e in events])
    return poison_aware(events, ctx)


