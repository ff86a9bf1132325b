"""A small TCP proxy on 127.0.0.1 for chaos tests: counts connects, can go silent or cut links.

Modes for new connections:

* ``forward`` - pass bytes both ways to the target;
* ``refuse`` - accept and close at once (the server is "down");
* ``silent`` - accept and never answer (a blackholed host: libpq waits for
  ``connect_timeout``).

:meth:`TcpProxy.sever` cuts every open link the way a firewall that dropped
its state would: the upstream side is closed, the client hears nothing until
it sends, and then its connection is closed.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Any


class _Link:
    __slots__ = ("client", "upstream", "severed")

    def __init__(self, client: socket.socket, upstream: socket.socket | None) -> None:
        self.client = client
        self.upstream = upstream
        self.severed = False

    def close(self) -> None:
        # shutdown() first: close() alone waits for a recv() blocked in another thread.
        for sock in (self.client, self.upstream):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()


class TcpProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.mode = "forward"
        self.accepted = 0
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port: int = self._listener.getsockname()[1]
        self._links: list[_Link] = []
        self._lock = threading.Lock()
        self._closing = False
        self._thread = threading.Thread(target=self._accept_loop, name="tcpproxy", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                mode = self.mode
            if mode == "refuse":
                client.close()
                continue
            upstream = None
            if mode == "forward":
                try:
                    upstream = socket.create_connection(self.target, timeout=5)
                    upstream.settimeout(None)
                except OSError:
                    client.close()
                    continue
            link = _Link(client, upstream)
            with self._lock:
                self._links.append(link)
            if upstream is not None:
                threading.Thread(target=self._client_to_server, args=(link,), daemon=True).start()
                threading.Thread(target=self._server_to_client, args=(link,), daemon=True).start()

    @staticmethod
    def _client_to_server(link: _Link) -> None:
        assert link.upstream is not None
        try:
            while True:
                data = link.client.recv(65536)
                if not data or link.severed:
                    break
                link.upstream.sendall(data)
        except OSError:
            pass
        # A severed link hears the client's next bytes and only then drops it.
        link.close()

    @staticmethod
    def _server_to_client(link: _Link) -> None:
        assert link.upstream is not None
        try:
            while True:
                data = link.upstream.recv(65536)
                if not data:
                    break
                link.client.sendall(data)
        except OSError:
            pass
        if not link.severed:
            with contextlib.suppress(OSError):
                link.client.shutdown(socket.SHUT_WR)

    def sever(self) -> int:
        """Cut all open links silently; return how many."""
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.severed = True
            if link.upstream is not None:
                with contextlib.suppress(OSError):
                    link.upstream.shutdown(socket.SHUT_RDWR)
        return len(links)

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.close()
        self._thread.join(5)

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
