"""The handler plug-in point: a function that processes one batch of events.

A handler is named by a dotted path in the consumer's config
(``package.module:function``) and called as ``handler(events, ctx)``.  It must
be replay-safe (the sequence is the idempotency key): a batch can be delivered
again after a crash between the side effect and the checkpoint.

* Return ``None`` (or ``HandlerResult()``) when every event succeeded.
* Return ``HandlerResult(failed_sequences=[...])`` to report failed items (as
  Lambda's ReportBatchItemFailures): the checkpoint advances to just before the
  lowest failed sequence and the rest is retried.
* Raise to fail the whole batch (retried with backoff, then dead-lettered).

Decorate it with ``@transactional`` to receive ``ctx.connection`` inside an
open Postgres transaction; when the checkpoint store is Postgres, the
checkpoint is saved in that same transaction (exactly-once handoff).

Decorate it with ``@writes_sink(describe)`` (``describe(options, stream) -> SinkDescription``) to say what it
writes (a table, a topic): it names the consumer's sink asset in Dagster's asset graph. Without it, the sink is
"output". Both only set an attribute (``transactional``, ``sink``), so a handler may also set it by hand.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from durability_pipelines.checkpoints.errors import ConfigError
from durability_pipelines.consumer.events import ChangeEvent

if TYPE_CHECKING:
    import psycopg


@dataclass
class HandlerResult:
    failed_sequences: list[str] = field(default_factory=list)


@dataclass
class HandlerContext:
    consumer: str
    adapter: str
    stream: str
    group: str
    shard: str | None
    run_id: str | None
    options: dict[str, Any]
    postgres_url: str | None
    log: logging.Logger
    #: open transaction for transactional handlers (commits with the checkpoint when the store is Postgres)
    connection: psycopg.Connection | None = None


@dataclass(frozen=True)
class SinkDescription:
    """What a handler writes, for the asset graph: a name (the sink asset's last key part), the
    technologies (Dagster kinds) and a sentence."""

    name: str
    kinds: tuple[str, ...] = ()
    description: str = ""


class Handler(Protocol):
    """What the runtime calls: ``handler(events, ctx)``."""

    def __call__(self, events: Sequence[ChangeEvent], ctx: HandlerContext) -> HandlerResult | None: ...


H = TypeVar("H", bound=Callable[..., Any])
SinkDescriber = Callable[[dict[str, Any], str], SinkDescription]


def transactional(handler: H) -> H:
    """Mark ``handler`` transactional: it gets ``ctx.connection`` in an open transaction, which carries the
    checkpoint too when the store is Postgres (exactly once)."""
    handler.transactional = True  # type: ignore[attr-defined]
    return handler


def writes_sink(describe: SinkDescriber) -> Callable[[H], H]:
    """Say what ``handler`` writes, from its options and the consumed stream: names its sink asset."""

    def mark(handler: H) -> H:
        handler.sink = describe  # type: ignore[attr-defined]
        return handler

    return mark


def load_handler(dotted: str) -> Handler:
    """Import ``package.module:function`` (or ``package.module.function``)."""
    module_name, _, attr = dotted.partition(":") if ":" in dotted else dotted.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"handler {dotted!r}: cannot import module {module_name!r}: {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"handler {dotted!r}: module {module_name!r} has no callable {attr!r}")
    return fn


def describe_sink(dotted: str, options: dict[str, Any], stream: str) -> SinkDescription:
    """The handler's own ``sink`` description (from its options and the consumed stream), or a generic one."""
    describe = getattr(load_handler(dotted), "sink", None)
    if callable(describe):
        return describe(options, stream)
    return SinkDescription("output", (), f"whatever handler {dotted} writes")


def is_transactional(handler: Callable[..., Any]) -> bool:
    return bool(getattr(handler, "transactional", False))


def noop(events: Sequence[ChangeEvent], ctx: HandlerContext) -> None:
    """A handler that does nothing (for benchmarks and dry runs)."""
    ctx.log.debug("noop handler: %d events", len(events))
