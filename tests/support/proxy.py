"""A threaded TCP proxy that can take a real server "down" for the clients that go through it.

Fault tests need an outage over a real connection without stopping a shared server: point the
client at ``proxy.url_for(url)``, then ``down()`` (every live connection is closed and new ones are
refused, as if the server died) and ``up()`` (connections are accepted again, on the same port).
``stall()`` keeps connections open but moves no bytes (a network partition: clients time out).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType
from urllib.parse import urlsplit, urlunsplit

_CHUNK = 65536


class FlakyProxy:
    """Forward ``127.0.0.1:<port>`` to ``target_host:target_port`` until told otherwise."""

    def __init__(
        self, target_host: str, target_port: int, *, listen_host: str = "127.0.0.1", listen_port: int = 0
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = listen_host
        self.port = listen_port
        self.accepted = 0  # connections accepted so far, for assertions
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._flowing = threading.Event()
        self._closed = False
        self.up()

    # --- control ---------------------------------------------------------------------------

    @property
    def is_up(self) -> bool:
        return self._listener is not None

    def up(self) -> None:
        """Accept and forward connections again (same port); also ends a ``stall()``."""
        with self._lock:
            self._flowing.set()
            if self._listener is not None or self._closed:
                return
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.host, self.port))
            listener.listen(128)
            self.port = listener.getsockname()[1]
            self._listener = listener
        threading.Thread(
            target=self._accept_loop, args=(listener,), name=f"proxy-accept-{self.port}", daemon=True
        ).start()

    def down(self) -> None:
        """Close every live connection and refuse new ones until ``up()``."""
        with self._lock:
            listener, self._listener = self._listener, None
            live = list(self._sockets)
            self._sockets.clear()
        if listener is not None:
            _hard_close(listener)
        for sock in live:
            _hard_close(sock)

    def stall(self) -> None:
        """Keep connections (and new ones) open but forward nothing until ``up()``."""
        self._flowing.clear()

    def close(self) -> None:
        """Shut the proxy down for good."""
        self._closed = True
        self.down()
        self._flowing.set()  # release pumps waiting in stall()

    def url_for(self, original_url: str) -> str:
        """``original_url`` with its host and port replaced by the proxy's (user, password, path kept)."""
        parts = urlsplit(original_url)
        if not parts.hostname:
            raise ValueError(f"cannot proxy a URL without a TCP host: {original_url!r}")
        userinfo, sep, _ = parts.netloc.rpartition("@")
        return urlunsplit(parts._replace(netloc=f"{userinfo}{sep}{self.host}:{self.port}"))

    @property
    def live_connections(self) -> int:
        """Client connections currently open through the proxy."""
        with self._lock:
            return len(self._sockets) // 2

    # --- forwarding ------------------------------------------------------------------------

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # listener closed by down()/close()
            client.settimeout(None)
            try:
                upstream = socket.create_connection((self.target_host, self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                _hard_close(client)  # the real server is down: so is the proxied one
                continue
            with self._lock:
                if self._listener is not listener:  # went down while we connected
                    _hard_close(client)
                    _hard_close(upstream)
                    return
                self._sockets.update((client, upstream))
                self.accepted += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(_CHUNK)
                if not data:
                    break
                while not self._flowing.wait(0.05):
                    if src.fileno() == -1:
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._sockets.discard(src)
                self._sockets.discard(dst)
            _hard_close(src)
            _hard_close(dst)

    def __enter__(self) -> FlakyProxy:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "up" if self.is_up else "down"
        return f"<FlakyProxy {self.host}:{self.port} -> {self.target_host}:{self.target_port} {state}>"


def _hard_close(sock: socket.socket) -> None:
    """Shut down both directions (wakes a blocked accept/recv in another thread), then close."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
