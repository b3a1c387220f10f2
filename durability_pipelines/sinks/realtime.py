"""Publish change events to Supabase Realtime broadcast channels.

Two paths, two guarantees (see ``docs/supabase.md``):

* ``broadcast_handler`` (transactional): calls ``realtime.send`` for every event inside the
  consumer's Postgres transaction. With the Postgres checkpoint store the checkpoint commits in that
  same transaction, so a batch is published exactly once: a crash before commit publishes nothing,
  the retry publishes it once. Realtime then broadcasts the committed ``realtime.messages`` rows.
  ``realtime.send`` turns its own errors into a WARNING (it never fails the caller's transaction),
  so the handler counts the rows that landed and raises if any is missing.
* ``rest_broadcast_handler`` (not transactional): ``POST /realtime/v1/api/broadcast``. A crash
  between the POST and the checkpoint re-sends the batch: at-least-once. Every payload carries
  ``adapter/stream/shard/sequence``; subscribers drop what they have seen.

Neither is idempotent (``writes_sink(..., idempotent=False)``): a message sent again reaches its subscribers
again. So a consumer of either never replays below the highest position it recorded (another worker moving its
checkpoint back stops the shard) unless an operator rewinds it on purpose (``checkpoints rewind``).

Payload of every message: ``ChangeEvent.to_json_dict()`` (``event, keys, new_image, old_image,
sequence, shard, stream, adapter, created_at, event_id``) plus, on the database path, ``id`` (a
fresh UUID per message, which ``realtime.send`` keeps as the message id).
"""

from __future__ import annotations

import json
import os
import re
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import httpx
import psycopg
from psycopg import errors as pg_errors
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from durability_pipelines.checkpoints.errors import ConfigError, DurabilityError
from durability_pipelines.consumer.events import ChangeEvent
from durability_pipelines.consumer.handlers import (
    HandlerContext,
    SinkDescriber,
    SinkDescription,
    transactional,
    writes_sink,
)
from durability_pipelines.sources.backoff import BackoffPolicy

__all__ = [
    "BroadcastMessage",
    "BroadcastOptions",
    "RealtimeError",
    "RealtimeNotInstalledError",
    "RealtimePublishError",
    "RealtimeSendError",
    "RestBroadcastOptions",
    "RestBroadcaster",
    "broadcast_handler",
    "broadcast_payload",
    "install_realtime_fixture",
    "rest_broadcast_handler",
    "send_in_transaction",
]

FIXTURE_SQL = (resources.files("durability_pipelines.sinks") / "realtime_fixture.sql").read_text()
FIXTURE_MARKER = "durability_pipelines realtime fixture"
BROADCAST_PATH = "/realtime/v1/api/broadcast"
_FIXTURE_LOCK = 72_190_321
_SEND_SIGNATURE = "realtime.send(jsonb,text,text,boolean)"


class RealtimeError(DurabilityError):
    """Base class for Realtime publishing errors."""


class RealtimeNotInstalledError(RealtimeError):
    """The database has no ``realtime.send`` / ``realtime.messages``."""


class RealtimeSendError(RealtimeError):
    """``realtime.send`` swallowed a failure: some messages did not land (the batch is rolled back)."""


class RealtimePublishError(RealtimeError):
    """The REST broadcast endpoint refused the batch or stayed unreachable through every retry."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


# -- fixture -----------------------------------------------------------------------------------


def install_realtime_fixture(conn: psycopg.Connection) -> bool:
    """Create the local ``realtime`` schema (messages + send) unless a real one is there.

    Returns False, changing nothing, when ``realtime.send`` exists and is not this fixture (a
    Supabase project's own must never be replaced). Idempotent and safe to run concurrently.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_FIXTURE_LOCK,))
        row = conn.execute(
            "SELECT to_regprocedure(%s) IS NOT NULL, obj_description(to_regprocedure(%s), 'pg_proc')",
            (_SEND_SIGNATURE, _SEND_SIGNATURE),
        ).fetchone()
        if row[0] and row[1] != FIXTURE_MARKER:
            return False
        conn.execute(FIXTURE_SQL)
    return True


# -- options -----------------------------------------------------------------------------------


class BroadcastOptions(BaseModel):
    """``handler_options`` of ``broadcast_handler``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    topic: str | None = Field(default=None, description="Realtime topic (channel name); default: the stream")
    event: str | None = Field(default=None, description="Broadcast event name; default: the change's event name")
    private: bool = Field(default=False, description="Deliver to private channels only (RLS-authorized)")

    @classmethod
    def from_context(cls, ctx: HandlerContext) -> BroadcastOptions:
        try:
            return cls.model_validate(ctx.options or {})
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(options)'}: {e['msg']}" for e in exc.errors())
            raise ConfigError(
                f"consumer {ctx.consumer}: invalid handler_options for {cls.__name__}: {problems}. "
                f"Allowed keys: {', '.join(cls.model_fields)}"
            ) from None

    def topic_for(self, ctx: HandlerContext) -> str:
        topic = self.topic or ctx.stream
        if topic.startswith("realtime:"):
            raise ConfigError(
                f"consumer {ctx.consumer}: topic {topic!r} includes the 'realtime:' wire prefix; give the channel "
                f"name only ({topic.removeprefix('realtime:')!r}), as clients pass it to client.channel()"
            )
        return topic


class RestBroadcastOptions(BroadcastOptions):
    """``handler_options`` of ``rest_broadcast_handler``."""

    url_env: str = Field(default="SUPABASE_URL", description="Env var holding the project URL (https://<ref>.supabase.co)")
    key_env: str = Field(default="SUPABASE_SERVICE_ROLE_KEY", description="Env var holding the API key")
    max_attempts: int = Field(default=5, ge=1, le=20)
    messages_per_request: int = Field(default=100, ge=1, le=1000)


def broadcast_payload(event: ChangeEvent) -> dict[str, Any]:
    """What subscribers receive; ``adapter/stream/shard/sequence`` identify it for dedup."""
    return event.to_json_dict()


# -- database path (exactly once with a Postgres checkpoint) -----------------------------------

_SEND_SQL = "SELECT realtime.send(m.p, m.e, %s, %s) FROM unnest(%s::jsonb[], %s::text[]) AS m(p, e)"
# inserted_at defaults to now() (transaction start); the window only lets Supabase prune partitions.
_LANDED_SQL = """SELECT count(*) FROM realtime.messages
WHERE topic = %s AND payload->>'id' = ANY(%s::text[]) AND inserted_at >= now()::timestamp - interval '1 day'"""


def send_in_transaction(conn: psycopg.Connection, events: Sequence[ChangeEvent], *, topic: str,
                        event: str | None = None, private: bool = False) -> int:
    """``realtime.send`` every event on ``conn`` (the caller's transaction); verify all landed.

    Raises ``RealtimeSendError`` when fewer rows landed than were sent (realtime.send reports its
    failures only as warnings); the caller's transaction must then roll back, which raising does
    inside ``PostgresCheckpointStore.transaction()`` / the runtime. Returns the number sent.
    """
    if not events:
        return 0
    ids = [str(uuid.uuid4()) for _ in events]
    payloads = [json.dumps({**broadcast_payload(e), "id": i}, default=str) for e, i in zip(events, ids, strict=True)]
    names = [event or e.event_name for e in events]
    warnings: list[str] = []

    def on_notice(diag: psycopg.errors.Diagnostic) -> None:
        if (diag.severity_nonlocalized or diag.severity) == "WARNING":
            warnings.append(diag.message_primary or "")

    conn.add_notice_handler(on_notice)
    try:
        conn.execute(_SEND_SQL, (topic, private, payloads, names))
        (landed,) = conn.execute(_LANDED_SQL, (topic, ids)).fetchone()
    except (pg_errors.UndefinedFunction, pg_errors.InvalidSchemaName, pg_errors.UndefinedTable) as exc:
        raise RealtimeNotInstalledError(
            f"realtime.send / realtime.messages is missing in this database ({exc.diag.message_primary}). On Supabase "
            "the realtime schema exists: point the consumer at the project's database. Locally, create the "
            "stand-in once with durability_pipelines.sinks.realtime.install_realtime_fixture(conn). "
            "The batch was rolled back and not checkpointed."
        ) from None
    except pg_errors.InsufficientPrivilege as exc:
        raise RealtimeSendError(
            f"no privilege to publish or to verify publication on realtime.messages ({exc.diag.message_primary}). "
            "Connect as the project's postgres user (it may call realtime.send and read realtime.messages). "
            "The batch was rolled back and not checkpointed."
        ) from None
    finally:
        conn.remove_notice_handler(on_notice)
    if landed != len(events):
        why = f": {warnings[0]}" if warnings else ""
        raise RealtimeSendError(
            f"realtime.send stored {landed} of {len(events)} messages for topic {topic!r}{why}. realtime.send "
            "swallows its errors as warnings, so the batch is failed on purpose and rolled back with its "
            "checkpoint; it is retried, then dead-lettered. Check realtime.messages (partition for today, "
            "triggers, disk) and the Postgres log."
        )
    return len(events)


def _realtime_sink(how: str) -> SinkDescriber:
    def describe(options: dict[str, Any], stream: str) -> SinkDescription:
        topic = (options or {}).get("topic") or stream
        return SinkDescription(f"realtime_{re.sub(r'[^A-Za-z0-9_]', '_', str(topic))}", ("supabase",),
                               f"Supabase Realtime broadcast topic {topic!r} ({how})")

    return describe


@transactional
@writes_sink(_realtime_sink("realtime.send in the checkpoint's transaction: exactly once"), idempotent=False)
def broadcast_handler(events: Sequence[ChangeEvent], ctx: HandlerContext) -> None:
    """Transactional handler: every event via ``realtime.send`` in the checkpoint's transaction.

    ``handler_options``: ``topic`` (default: the stream), ``event`` (default: the change's event
    name), ``private`` (default false).
    """
    if ctx.connection is None:
        raise ConfigError(
            f"consumer {ctx.consumer}: broadcast_handler publishes through the checkpoint's Postgres transaction and "
            "got no connection; it must be called by the consumer runtime (it is marked transactional)"
        )
    opts = BroadcastOptions.from_context(ctx)
    topic = opts.topic_for(ctx)
    sent = send_in_transaction(ctx.connection, events, topic=topic, event=opts.event, private=opts.private)
    ctx.log.info("realtime.send: %d messages to topic %s (commit pending)", sent, topic)





# -- REST path (at-least-once) -----------------------------------------------------------------


@dataclass(frozen=True)
class BroadcastMessage:
    topic: str
    event: str
    payload: dict[str, Any]
    private: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"topic": self.topic, "event": self.event, "payload": self.payload, "private": self.private}


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, RealtimePublishError):
        return exc.status is None or exc.status == 429 or exc.status >= 500
    return isinstance(exc, httpx.TransportError)


class RestBroadcaster:
    """Sends broadcasts through Realtime's REST API: one POST per ``messages_per_request`` messages.

    ``url`` is the project URL (``https://<ref>.supabase.co``, or a local server's). Transport
    errors, 429 and 5xx are retried with bounded, jittered backoff; any other status fails at once.
    A retried POST may have been applied already: delivery is at-least-once.
    """

    def __init__(self, url: str, api_key: str, *, timeout_s: float = 10.0, messages_per_request: int = 100,
                 backoff: BackoffPolicy | None = None, client: httpx.Client | None = None) -> None:
        if not url or not api_key:
            raise ConfigError("RestBroadcaster needs the project URL and an API key")
        self.endpoint = url.rstrip("/") + BROADCAST_PATH
        self.messages_per_request = messages_per_request
        self.backoff = backoff or BackoffPolicy(max_attempts=5, base_delay_s=0.2, max_delay_s=5.0)
        self._client = client or httpx.Client(timeout=timeout_s)
        self._headers = {"apikey": api_key, "Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}

    def send(self, messages: Sequence[BroadcastMessage]) -> int:
        """POST every message; returns how many were accepted (202)."""
        for start in range(0, len(messages), self.messages_per_request):
            chunk = messages[start:start + self.messages_per_request]
            body = json.dumps({"messages": [m.to_json() for m in chunk]}, default=str)
            try:
                self.backoff.call(lambda body=body: self._post(body), is_retryable=_retryable)
            except httpx.TransportError as exc:
                raise RealtimePublishError(
                    f"Realtime REST broadcast at {self.endpoint} unreachable after {self.backoff.max_attempts} attempts "
                    f"({type(exc).__name__}: {exc}); {start} of {len(messages)} messages were sent. Nothing is "
                    "checkpointed: the batch is retried (subscribers drop repeats by sequence)."
                ) from None
        return len(messages)

    def _post(self, body: str) -> None:
        response = self._client.post(self.endpoint, content=body, headers=self._headers)
        if response.status_code == 202:
            return
        detail = response.text[:300]
        hint = {401: "check the API key (key_env)", 403: "the key may not broadcast to this topic",
                404: "check the project URL (url_env); the endpoint needs Realtime >= 2.x",
                429: "rate limited: lower the batch rate or raise the project's Realtime quota"}.get(
            response.status_code, "see the Realtime logs")
        raise RealtimePublishError(
            f"Realtime REST broadcast at {self.endpoint} answered {response.status_code} ({detail!r}): {hint}. "
            "The batch is not checkpointed and will be retried.",
            status=response.status_code,
        )

    def broadcast(self, topic: str, event: str, payload: dict[str, Any], *, private: bool = False) -> None:
        self.send([BroadcastMessage(topic, event, payload, private)])

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> RestBroadcaster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_BROADCASTERS: dict[tuple[str, str, int, int], RestBroadcaster] = {}
_BROADCASTERS_LOCK = threading.Lock()


def _broadcaster(opts: RestBroadcastOptions, ctx: HandlerContext,
                 getenv: Callable[[str], str | None] = os.environ.get) -> RestBroadcaster:
    url, key = getenv(opts.url_env), getenv(opts.key_env)
    missing = [name for name, value in ((opts.url_env, url), (opts.key_env, key)) if not value]
    if missing:
        raise ConfigError(
            f"consumer {ctx.consumer}: rest_broadcast_handler needs {' and '.join(missing)} set (the project URL "
            "and an API key allowed to broadcast; handler_options url_env/key_env name other variables)"
        )
    cache_key = (url or "", key or "", opts.max_attempts, opts.messages_per_request)
    with _BROADCASTERS_LOCK:
        found = _BROADCASTERS.get(cache_key)
        if found is None:
            found = _BROADCASTERS[cache_key] = RestBroadcaster(
                url or "", key or "", messages_per_request=opts.messages_per_request,
                backoff=BackoffPolicy(max_attempts=opts.max_attempts, base_delay_s=0.2, max_delay_s=5.0),
            )
        return found


@writes_sink(_realtime_sink("REST API: at least once"), idempotent=False)
def rest_broadcast_handler(events: Sequence[ChangeEvent], ctx: HandlerContext) -> None:
    """Non-transactional handler: broadcast every event through the REST API (at-least-once).

    ``handler_options``: ``topic``, ``event``, ``private`` as for ``broadcast_handler``, plus
    ``url_env`` (default ``SUPABASE_URL``), ``key_env`` (default ``SUPABASE_SERVICE_ROLE_KEY``),
    ``max_attempts``, ``messages_per_request``.
    """
    opts = RestBroadcastOptions.from_context(ctx)
    topic = opts.topic_for(ctx)
    messages = [BroadcastMessage(topic, opts.event or e.event_name, broadcast_payload(e), opts.private) for e in events]
    sent = _broadcaster(opts, ctx).send(messages)
    ctx.log.info("realtime REST broadcast: %d messages to topic %s", sent, topic)

