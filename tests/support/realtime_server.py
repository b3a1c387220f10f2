"""A small local Supabase Realtime server for tests: Phoenix V1 JSON over websockets, plus REST broadcast.

Nothing that runs the real (Elixir) Realtime server installs here, so this speaks just enough of its
protocol for supabase-py 2.34.1 (``realtime`` package) to connect, join, broadcast and receive:

* ``GET /realtime/v1/websocket?apikey=<key>&vsn=1.0.0`` upgrades to a websocket (wrong key: 403).
  ``phx_join`` is answered ``ok`` with the ``postgres_changes`` bindings echoed back with ids (the
  client matches them by position); ``heartbeat`` on topic ``phoenix`` is answered; ``broadcast``
  is fanned out to the other subscribers of the topic (and to the sender when its join config has
  ``broadcast.self``), acknowledged when ``broadcast.ack``; ``phx_leave`` removes the subscription.
* ``POST /realtime/v1/api/broadcast`` with ``{"messages": [{topic, event, payload, private?}]}`` and
  ``POST /realtime/v1/api/broadcast/<topic>/events/<event>[?private=true]`` with the payload as body
  (what ``AsyncRealtimeChannel.http_send`` sends) answer 202 after fanning out; a bad key gets 401.
* ``publish_from_db(conn)`` reads ``realtime.messages`` rows it has not delivered yet and fans them out,
  standing in for Realtime's replication of that table (call it after the sending transaction committed).

Messages reach subscribers whose join had the same ``private`` flag; there is no authorization. What it
does not reproduce is listed in ``docs/supabase.md``. One asyncio loop in a daemon thread; every public
method is thread-safe and blocking (call it via ``asyncio.to_thread`` from async code if you like).

    with LocalRealtimeServer() as server:
        client = await acreate_client(server.url, server.api_key)
        channel = client.channel("room1")
        channel.on_broadcast("*", queue.put_nowait)
        await channel.subscribe()
        server.publish("room1", "greet", {"hello": "world"})
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import psycopg
from websockets.frames import Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol

T = TypeVar("T")

WEBSOCKET_PATH = "/realtime/v1/websocket"
BROADCAST_PATH = "/realtime/v1/api/broadcast"
VSN = "1.0.0"
TOPIC_PREFIX = "realtime:"
_REASONS = {200: "OK", 202: "Accepted", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            405: "Method Not Allowed", 413: "Payload Too Large"}
MAX_BODY = 4 * 1024 * 1024


@dataclass
class _Join:
    topic: str
    join_ref: str | None
    self_broadcast: bool
    ack: bool
    private: bool


@dataclass
class _Client:
    id: int
    protocol: ServerProtocol
    writer: asyncio.StreamWriter
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    joins: dict[str, _Join] = field(default_factory=dict)

    @property
    def open(self) -> bool:
        return self.protocol.state is State.OPEN


class LocalRealtimeServer:
    """Start with ``start()`` (or ``with``); ``url`` is the project URL to give ``acreate_client``."""

    def __init__(self, api_key: str = "local-anon-key", *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.api_key = api_key
        self.host = host
        self.port = port
        self.stats: collections.Counter[str] = collections.Counter()
        #: every message accepted from REST or the database, as {"topic","event","payload","private","via"}
        self.published: list[dict[str, Any]] = []
        self._clients: dict[int, _Client] = {}
        self._ids = itertools.count(1)
        self._binding_ids = itertools.count(1)
        self._db_seen: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._pollers: list[tuple[threading.Event, threading.Thread]] = []

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def websocket_url(self) -> str:
        return f"ws://{self.host}:{self.port}{WEBSOCKET_PATH}"

    def start(self, timeout: float = 10.0) -> LocalRealtimeServer:
        if self._thread is not None:
            return self
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._handle, self.host, self.port, limit=MAX_BODY))
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:  # noqa: BLE001 - reported to start()
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="local-realtime", daemon=True)
        self._thread.start()
        if not ready.wait(timeout) or failure:
            raise RuntimeError(f"local Realtime server did not start: {failure[0] if failure else 'timeout'}")
        return self

    def stop(self) -> None:
        for stop, thread in self._pollers:
            stop.set()
            thread.join(5)
        self._pollers.clear()
        if self._loop is None or self._thread is None:
            return
        with contextlib.suppress(Exception):
            self._call(self._shutdown(), timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._thread = None
        self._loop = None

    def __enter__(self) -> LocalRealtimeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for client in list(self._clients.values()):
            with contextlib.suppress(Exception):
                if client.open:
                    client.protocol.send_close(1001, "server shutting down")
                    await self._flush(client)
                client.writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        if self._loop is None:
            coro.close()
            raise RuntimeError("the local Realtime server is not running; call start() first")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # -- public, thread-safe -----------------------------------------------------------------------
    def publish(self, topic: str, event: str, payload: dict[str, Any], *, private: bool = False) -> int:
        """Broadcast to the subscribers of channel ``topic`` (no ``realtime:`` prefix); returns how many got it."""
        self.published.append({"topic": topic, "event": event, "payload": payload, "private": private, "via": "api"})
        return self._call(self._fan_out(TOPIC_PREFIX + topic, event, payload, private=private))

    def subscribers(self, topic: str) -> int:
        """How many connections have joined channel ``topic``."""
        return sum(1 for c in list(self._clients.values()) if TOPIC_PREFIX + topic in c.joins)

    def publish_from_db(self, conn: psycopg.Connection | str, *, topic: str | None = None) -> int:
        """Fan out every committed ``realtime.messages`` row not delivered yet; returns how many.

        Pass a URL or an autocommit connection (an open transaction would see a stale snapshot).
        Rows are delivered in send order (per transaction), once each (ids are remembered).
        """
        query = ("SELECT id::text, topic, event, payload, private FROM realtime.messages "
                 "WHERE extension = 'broadcast'")
        params: list[Any] = []
        if topic is not None:
            query += " AND topic = %s"
            params.append(topic)
        # inserted_at is the transaction start; within one transaction every realtime.send runs in its own
        # subtransaction, whose xids grow: that restores the send order (as replication would deliver it)
        query += " ORDER BY inserted_at, xmin::text::bigint, id"
        if isinstance(conn, str):
            with psycopg.connect(conn, autocommit=True) as own:
                rows = own.execute(query, params).fetchall()
        else:
            rows = conn.execute(query, params).fetchall()
        fresh = [r for r in rows if r[0] not in self._db_seen]
        for msg_id, msg_topic, event, payload, private in fresh:
            self._db_seen.add(msg_id)
            body = payload if isinstance(payload, dict) else {"value": payload}
            self.published.append({"topic": msg_topic, "event": event, "payload": body, "private": bool(private),
                                   "via": "database"})
            self.stats["db_messages"] += 1
            self._call(self._fan_out(TOPIC_PREFIX + msg_topic, event or "", body, private=bool(private)))
        return len(fresh)

    def start_db_poller(self, conninfo: str, interval_s: float = 0.1) -> None:
        """Call ``publish_from_db`` every ``interval_s`` in a thread until ``stop()`` (for demos)."""
        stop = threading.Event()

        def poll() -> None:
            with psycopg.connect(conninfo, autocommit=True) as conn:
                while not stop.wait(interval_s):
                    with contextlib.suppress(psycopg.Error):
                        self.publish_from_db(conn)

        thread = threading.Thread(target=poll, name="local-realtime-db-poller", daemon=True)
        thread.start()
        self._pollers.append((stop, thread))

    # -- connections -------------------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            lines = head.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3:
                await self._respond(writer, 400, {"message": "malformed request line"})
                return
            method, target, _ = parts
            headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
            split = urlsplit(target)
            if method == "GET" and headers.get("upgrade", "").lower() == "websocket":
                await self._websocket(reader, writer, head, split.path, parse_qs(split.query))
            elif method == "POST":
                await self._http(reader, writer, split.path, parse_qs(split.query), headers)
            else:
                await self._respond(writer, 404 if method == "GET" else 405, {"message": f"{method} {split.path}"})
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()
            if task is not None:
                self._tasks.discard(task)

    async def _respond(self, writer: asyncio.StreamWriter, status: int, body: dict[str, Any] | None = None) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n")
        writer.write(head.encode() + data)
        await writer.drain()

    def _authorized(self, headers: dict[str, str]) -> bool:
        bearer = headers.get("authorization", "")
        return headers.get("apikey") == self.api_key or bearer == f"Bearer {self.api_key}"

    # -- REST --------------------------------------------------------------------------------------
    async def _http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str,
                    query: dict[str, list[str]], headers: dict[str, str]) -> None:
        length = int(headers.get("content-length") or 0)
        if length > MAX_BODY:
            await self._respond(writer, 413, {"message": "body too large"})
            return
        body = await reader.readexactly(length) if length else b""
        if not path.startswith(BROADCAST_PATH):
            await self._respond(writer, 404, {"message": f"no route {path}"})
            return
        if not self._authorized(headers):
            await self._respond(writer, 401, {"message": "invalid apikey"})
            return
        try:
            data = json.loads(body or b"null")
        except ValueError:
            await self._respond(writer, 400, {"message": "body is not JSON"})
            return
        messages: list[tuple[str, str, Any, bool]] = []
        if path.rstrip("/") == BROADCAST_PATH:
            if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
                await self._respond(writer, 400, {"message": 'expected {"messages": [...]}'})
                return
            for m in data["messages"]:
                if not isinstance(m, dict) or not isinstance(m.get("topic"), str) or not isinstance(m.get("event"), str):
                    await self._respond(writer, 400, {"message": "each message needs a topic and an event"})
                    return
                messages.append((m["topic"], m["event"], m.get("payload"), bool(m.get("private", False))))
        else:
            rest = path[len(BROADCAST_PATH):].strip("/").split("/")
            if len(rest) != 3 or rest[1] != "events":
                await self._respond(writer, 404, {"message": f"no route {path}"})
                return
            private = query.get("private", ["false"])[0].lower() == "true"
            messages.append((unquote(rest[0]), unquote(rest[2]), data, private))
        if any(not isinstance(payload, dict) for _, _, payload, _ in messages):
            # supabase-py drops a broadcast whose payload is not an object: refuse it visibly instead
            await self._respond(writer, 400, {"message": "payload must be a JSON object"})
            return
        for topic, event, payload, private in messages:
            self.published.append({"topic": topic, "event": event, "payload": payload, "private": private,
                                   "via": "rest"})
            self.stats["rest_messages"] += 1
            await self._fan_out(TOPIC_PREFIX + topic, event, payload, private=private)
        await self._respond(writer, 202)

    # -- websocket ---------------------------------------------------------------------------------
    async def _websocket(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes,
                         path: str, query: dict[str, list[str]]) -> None:
        protocol = ServerProtocol(max_size=MAX_BODY)
        protocol.receive_data(head)
        request = protocol.events_received()[0]
        if path.rstrip("/") != WEBSOCKET_PATH:
            response = protocol.reject(404, f"no websocket at {path}\n")
        elif query.get("apikey", [""])[0] != self.api_key:
            response = protocol.reject(403, "invalid apikey\n")
        elif query.get("vsn", [VSN])[0] != VSN:
            response = protocol.reject(400, f"unsupported vsn; this server speaks {VSN}\n")
        else:
            response = protocol.accept(request)
        protocol.send_response(response)
        client = _Client(next(self._ids), protocol, writer)
        await self._flush(client)
        if response.status_code != 101:
            return
        self._clients[client.id] = client
        self.stats["connections"] += 1
        fragments: list[bytes] = []
        try:
            while True:
                data = await reader.read(65536)
                if data:
                    protocol.receive_data(data)
                else:
                    protocol.receive_eof()
                for frame in protocol.events_received():
                    if frame.opcode in (Opcode.TEXT, Opcode.CONT):
                        fragments.append(frame.data)
                        if frame.fin:
                            text, fragments = b"".join(fragments), []
                            await self._on_message(client, text)
                await self._flush(client)
                if not data or protocol.state is State.CLOSED or protocol.close_expected():
                    break
        finally:
            self._clients.pop(client.id, None)

    async def _flush(self, client: _Client) -> None:
        async with client.lock:
            for data in client.protocol.data_to_send():
                if data:
                    client.writer.write(data)
                elif client.writer.can_write_eof():
                    client.writer.write_eof()
            await client.writer.drain()

    async def _send(self, client: _Client, message: dict[str, Any]) -> None:
        if not client.open:
            return
        client.protocol.send_text(json.dumps(message).encode())
        with contextlib.suppress(ConnectionError):
            await self._flush(client)

    async def _reply(self, client: _Client, msg: dict[str, Any], status: str, response: dict[str, Any]) -> None:
        await self._send(client, {"topic": msg.get("topic"), "event": "phx_reply", "ref": msg.get("ref"),
                                  "join_ref": msg.get("join_ref"), "payload": {"status": status, "response": response}})

    async def _on_message(self, client: _Client, text: bytes) -> None:
        try:
            msg = json.loads(text)
        except ValueError:
            self.stats["malformed"] += 1
            return
        if not isinstance(msg, dict):
            self.stats["malformed"] += 1
            return
        topic, event = msg.get("topic"), msg.get("event")
        payload = msg.get("payload") if isinstance(msg.get("payload"), dict) else {}
        self.stats[str(event)] += 1
        if topic == "phoenix" and event == "heartbeat":
            await self._reply(client, msg, "ok", {})
        elif event == "phx_join":
            await self._join(client, msg, str(topic), payload)
        elif event == "phx_leave":
            client.joins.pop(str(topic), None)
            await self._reply(client, msg, "ok", {})
        elif event == "broadcast":
            join = client.joins.get(str(topic))
            if join is None:
                await self._reply(client, msg, "error", {"reason": "unmatched topic"})
                return
            inner = payload.get("payload")
            if payload.get("type") == "broadcast" and isinstance(payload.get("event"), str):
                await self._fan_out(join.topic, payload["event"], inner, private=join.private,
                                    sender=None if join.self_broadcast else client.id)
            if join.ack:
                await self._reply(client, msg, "ok", {})
        elif event == "access_token":
            return  # accepted silently, as Realtime does; tokens are not checked here
        elif event == "presence":
            await self._reply(client, msg, "ok", {})  # accepted, not tracked (no presence_state/diff)
        else:
            await self._reply(client, msg, "error", {"reason": f"unsupported event {event!r}"})

    async def _join(self, client: _Client, msg: dict[str, Any], topic: str, payload: dict[str, Any]) -> None:
        config = payload.get("config") if isinstance(payload.get("config"), dict) else {}
        broadcast = config.get("broadcast") if isinstance(config.get("broadcast"), dict) else {}
        bindings = []
        for b in config.get("postgres_changes") or []:
            if not isinstance(b, dict):
                continue
            echoed = {"id": next(self._binding_ids), "event": b.get("event", "*"), "schema": b.get("schema", "public")}
            for key in ("table", "filter"):
                if b.get(key) is not None:
                    echoed[key] = b[key]
            bindings.append(echoed)
        client.joins[topic] = _Join(topic, msg.get("join_ref") or msg.get("ref"), bool(broadcast.get("self")),
                                    bool(broadcast.get("ack")), bool(config.get("private", False)))
        await self._reply(client, msg, "ok", {"postgres_changes": bindings})

    async def _fan_out(self, topic: str, event: str, payload: Any, *, private: bool, sender: int | None = None) -> int:
        message = {"topic": topic, "event": "broadcast", "ref": None,
                   "payload": {"type": "broadcast", "event": event, "payload": payload}}
        delivered = 0
        for client in list(self._clients.values()):
            join = client.joins.get(topic)
            if join is None or join.private != private or client.id == sender:
                continue
            await self._send(client, {**message, "join_ref": join.join_ref})
            delivered += 1
        self.stats["delivered"] += delivered
        return delivered
