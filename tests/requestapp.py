"""Apps that tests/test_request_servers.py runs under gunicorn, uWSGI and waitress.

``tests.requestapp:wsgi_app`` (plain WSGI) and ``tests.requestapp:flask_app``
(Flask), both behind one middleware built from ``REQUESTAPP_*`` variables:
``TRANSACTION``, ``CHECKOUT``, ``MAX_SIZE``, ``TIMEOUT``. The DSN comes from
``DATABASE_URL``. ``/_pool`` is the stats path; ``/observed`` answers what
this worker saw: how often a file body was read in Python, and the thread
names in which connections went back to the pool.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs

import flask

from pgpool_wsgi import ConnectionPool, PgPoolMiddleware

OBSERVED: dict[str, Any] = {"reads": 0, "putconn_threads": []}


class RecordingPool(ConnectionPool):
    """Notes the thread each connection comes back in."""

    def putconn(self, conn: Any, *, discard: bool = False) -> None:
        OBSERVED["putconn_threads"].append(threading.current_thread().name)
        super().putconn(conn, discard=discard)


class CountingFile:
    """A file whose reads in Python are counted; sendfile() uses fileno() and reads nothing here."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "rb")  # noqa: SIM115 - closed by close(), called by the server

    def fileno(self) -> int:
        return self._file.fileno()

    def read(self, size: int = -1) -> bytes:
        OBSERVED["reads"] += 1
        return self._file.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def __iter__(self) -> Iterator[bytes]:
        while True:
            chunk = self.read(8192)
            if not chunk:
                return
            yield chunk

    def close(self) -> None:
        self._file.close()


class Sized:
    """A one-chunk body with a length (waitress then sends Content-Length)."""

    def __init__(self, chunk: bytes) -> None:
        self.chunk = chunk

    def __iter__(self) -> Iterator[bytes]:
        return iter([self.chunk])

    def __len__(self) -> int:
        return 1


def _query(conn: Any, sql: str, params: tuple[Any, ...] = ()) -> Any:
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchone()[0] if cur.description else None


def _text(start_response: Callable[..., Any], body: bytes, status: str = "200 OK") -> list[bytes]:
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def _plain(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    args = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    handle = environ["pgpool.handle"]
    if path == "/observed":
        return _text(start_response, json.dumps(OBSERVED).encode())
    if path == "/file":
        _query(handle.conn, "SELECT 1")
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return environ["wsgi.file_wrapper"](CountingFile(args["path"]), 65536)  # type: ignore[no-any-return]
    if path == "/sized":
        _query(handle.conn, "SELECT 1")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Sized(b"hello world\n")
    if path == "/hold":  # keeps a connection busy for a while
        _query(handle.conn, "SELECT pg_sleep(%s)", (float(args["sleep"]),))
        return _text(start_response, b"held\n")
    if path == "/write-signup":
        _query(handle.conn, "INSERT INTO signup VALUES (%s)", (args["name"],))
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"account ")
        write(b"created\n")
        return []
    if path == "/stream":  # a lazy checkout inside the body, before or after the first chunk
        start_response("200 OK", [("Content-Type", "text/plain")])
        return _stream(handle, args.get("when") == "late")
    return _text(start_response, b"not found\n", "404 Not Found")


def _stream(handle: Any, late: bool) -> Iterator[bytes]:
    if late:
        yield b"first chunk\n"
    yield str(_query(handle.conn, "SELECT 1")).encode()


_flask = flask.Flask("requestapp")


@_flask.route("/signup", methods=["POST"])
def signup() -> str:
    _query(flask.request.environ["pgpool.conn"], "INSERT INTO signup VALUES (%s)", (flask.request.args["name"],))
    return "account created\n"


def _middleware(app: Any) -> PgPoolMiddleware:
    env = os.environ.get
    pool = RecordingPool(max_size=int(env("REQUESTAPP_MAX_SIZE", "2")), timeout=float(env("REQUESTAPP_TIMEOUT", "10")))
    return PgPoolMiddleware(app, pool=pool, transaction=env("REQUESTAPP_TRANSACTION", "manual"),
                            checkout=env("REQUESTAPP_CHECKOUT", "eager"), stats_path="/_pool")


wsgi_app = _middleware(_plain)
flask_app = _middleware(_flask)
