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

``@writes_sink(describe, idempotent=False)`` declares a sink whose effect a replay repeats (a broadcast, an
e-mail, a webhook): sequence-keyed rows absorb a replay, a message sent twice reaches its subscribers twice.
Such a consumer never replays below the highest position it recorded unless an operator rewound it on purpose
(``checkpoints rewind``); see ``ConsumerRuntime.guard_replay``. Undeclared handlers are idempotent, as the
contract above requires (attribute ``idempotent``).
"""

from __future__ import annotations

import dataclasses
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
    #: whether delivering an event again is harmless (filled from the handler by ``describe_sink``)
    idempotent: bool = True


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


def writes_sink(describe: SinkDescriber, *, idempotent: bool = True) -> Callable[[H], H]:
    """Say what ``handler`` writes, from its options and the consumed stream: names its sink asset.

    ``idempotent=False``: a replay repeats the sink's effect, so the consumer refuses to replay unless told to
    (the runtime's replay guard); the default keeps the handler contract (replay-safe by sequence)."""

    def mark(handler: H) -> H:
        handler.sink = describe  # type: ignore[attr-defined]
        handler.idempotent = idempotent  # type: ignore[attr-defined]
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
    handler = load_handler(dotted)
    describe = getattr(handler, "sink", None)
    if callable(describe):
        return dataclasses.replace(describe(options, stream), idempotent=is_idempotent(handler))
    return SinkDescription("output", (), f"whatever handler {dotted} writes", idempotent=is_idempotent(handler))


def is_transactional(handler: Callable[..., Any]) -> bool:
    return bool(getattr(handler, "transactional", False))


def is_idempotent(handler: Callable[..., Any]) -> bool:
    """Whether a replay of ``handler``'s events is harmless: True unless it declared otherwise (the handler
    contract asks for replay safety; a sink that cannot give it says so with ``writes_sink(..., idempotent=False)``)."""
    return bool(getattr(handler, "idempotent", True))


def noop(events: Sequence[ChangeEvent], ctx: HandlerContext) -> None:
    """A handler that does nothing (for benchmarks and dry runs)."""
    ctx.log.debug("noop handler: %d events", len(events))
