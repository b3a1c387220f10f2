"""A real supabase-py async client subscribed to one broadcast topic, on its own event loop thread.

Tests that drive Dagster in the main thread (``execute_in_process`` wants it) can keep a Realtime
subscriber listening the whole time:

    with RealtimeSubscriber(server.url, server.api_key, "orders") as sub:
        ...  # run the pipeline
        messages = sub.wait_for(400, timeout=60)

Every broadcast the client receives is appended to ``messages`` as supabase-py hands it to the
``on_broadcast`` callback (``{"event": ..., "payload": ..., "type": "broadcast"}``), in arrival order.
Timeouts are hang guards: ``wait_for`` returns as soon as the count is reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Any

from supabase import acreate_client


class RealtimeSubscriber:
    def __init__(self, url: str, api_key: str, topic: str, *, private: bool = False) -> None:
        self.url, self.api_key, self.topic, self.private = url, api_key, topic, private
        self.messages: list[dict[str, Any]] = []
        self.states: list[tuple[str, Any]] = []
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: Any = None

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> RealtimeSubscriber:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(asyncio.wait_for(self._subscribe(), timeout))
            except BaseException as exc:  # noqa: BLE001 - reported to start()
                failure.append(exc)
                ready.set()
                with contextlib.suppress(Exception):
                    loop.run_until_complete(self._close())
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name=f"realtime-subscriber-{self.topic}", daemon=True)
        self._thread.start()
        if not ready.wait(timeout + 5) or failure:
            self.close()
            why = repr(failure[0]) if failure else "timeout"
            raise RuntimeError(f"supabase-py could not subscribe to {self.topic!r}: {why}")
        if self.states != [("SUBSCRIBED", None)]:
            self.close()
            raise RuntimeError(f"subscription to {self.topic!r} ended in states {self.states}")
        return self

    async def _subscribe(self) -> None:
        self._client = await acreate_client(self.url, self.api_key)
        channel = self._client.channel(
            self.topic, {"config": {"broadcast": {"self": False}, "private": self.private}})
        channel.on_broadcast("*", self._on_message)
        subscribed = asyncio.Event()

        def on_state(state: Any, err: Any) -> None:
            self.states.append((str(getattr(state, "value", state)), err))
            subscribed.set()

        await channel.subscribe(on_state)
        await subscribed.wait()

    def _on_message(self, message: dict[str, Any]) -> None:
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()

    async def _close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.remove_all_channels()
            with contextlib.suppress(Exception):
                await self._client.realtime.close()

    def close(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive() and loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._close(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(10)
        self._thread = None

    def __enter__(self) -> RealtimeSubscriber:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ----------------------------------------------------------------------------------
    def count(self) -> int:
        with self._cond:
            return len(self.messages)

    def snapshot(self) -> list[dict[str, Any]]:
        with self._cond:
            return list(self.messages)

    def wait_for(self, n: int, timeout: float) -> list[dict[str, Any]]:
        """Block until at least ``n`` messages arrived (hang guard ``timeout``); returns all so far."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.messages) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"subscriber of {self.topic!r} got {len(self.messages)} of {n} messages in {timeout:.0f}s")
                self._cond.wait(min(left, 0.5))
            return list(self.messages)

    def quiet(self, seconds: float) -> list[dict[str, Any]]:
        """Wait ``seconds`` more (for anything extra to show up); returns all messages."""
        time.sleep(seconds)
        return self.snapshot()
