"""The WSGI apps that ``bench/e2e.py`` serves under gunicorn, one per variant.

Configured by the environment (gunicorn passes it on to its workers):
``BENCH_VARIANT`` (which app), ``BENCH_DSN`` and ``BENCH_THREADS`` (threads
per worker, so connections per worker). Paths:

* ``/q?v=VALUE`` - ``SELECT %s`` with VALUE, answered with what the database
  returned (an echo);
* ``/noquery`` - no database work; the middleware still checks out (and
  returns) a connection, the other variants are the bare app there;
* ``/static/...`` - no database work; an ``exclude_paths`` prefix of the
  middleware, so it never checks out;
* ``/bare`` - (middleware variant only) the same app called without the
  middleware, so the three overhead rows run in the same processes.

Every variant runs the query in autocommit (one round trip, nothing to roll
back). Pools and connections that must not cross a fork are made in
gunicorn's ``post_fork`` hook (``bench/gunicorn_conf.py`` calls
:func:`post_fork`), in the worker. With ``BENCH_GC_STATS=DIR`` each worker
also counts the requests it served and the garbage collector's runs, and
writes them into DIR when it exits.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

import psycopg2
import psycopg2.extensions

VARIANT = os.environ.get("BENCH_VARIANT", "pgpool")
DSN = os.environ.get("BENCH_DSN", "")
THREADS = int(os.environ.get("BENCH_THREADS", "1"))

StartResponse = Callable[..., Any]
Environ = dict[str, Any]
View = Callable[[Environ, str], bytes]

_made: dict[str, Any] = {}  # what post_fork built in this worker
_local = threading.local()


class AutocommitConnection(psycopg2.extensions.connection):  # type: ignore[misc]
    """A psycopg2 connection that is in autocommit from the start."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.autocommit = True


def connect2() -> Any:
    return psycopg2.connect(DSN, connection_factory=AutocommitConnection)


def echo2(conn: Any, value: str) -> bytes:
    """``SELECT %s`` with psycopg2; the value as the database returned it."""
    cur = conn.cursor()
    cur.execute("SELECT %s", (value,))
    row = cur.fetchone()
    cur.close()
    return str(row[0]).encode()


def _value(environ: Environ) -> str:
    query = environ.get("QUERY_STRING", "")
    return query[2:] if query.startswith("v=") else query


def _reply(start_response: StartResponse, body: bytes) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def _wsgi(view: View) -> Callable[[Environ, StartResponse], Iterable[bytes]]:
    """A WSGI app running ``view`` on ``/q`` and answering ``ok`` elsewhere."""

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/q":
            return _reply(start_response, view(environ, _value(environ)))
        return _reply(start_response, b"ok")

    return app


# -- the variants' views --------------------------------------------------------


def pgpool_view(environ: Environ, value: str) -> bytes:
    return echo2(environ["pgpool.conn"], value)


def ceiling_view(environ: Environ, value: str) -> bytes:
    conn = getattr(_local, "conn", None)
    if conn is None:
        conn = _local.conn = _made["spare"].pop()  # one of the connections post_fork opened
    return echo2(conn, value)


def psycopg2_view(environ: Environ, value: str) -> bytes:
    pool = _made["pool"]
    conn = pool.getconn()
    try:
        return echo2(conn, value)
    finally:
        pool.putconn(conn)


def psycopg_pool_view(environ: Environ, value: str) -> bytes:
    with _made["pool"].connection() as conn:
        return str(conn.execute("SELECT %s", (value,)).fetchone()[0]).encode()


def sqlalchemy_view(environ: Environ, value: str) -> bytes:
    conn = _made["engine"].raw_connection()
    try:
        return echo2(conn, value)
    finally:
        conn.close()


def connect_view(environ: Environ, value: str) -> bytes:
    conn = connect2()
    try:
        return echo2(conn, value)
    finally:
        conn.close()


# -- what each variant builds in the worker -------------------------------------------


def post_fork() -> None:
    """Called by gunicorn's ``post_fork`` hook, in the new worker."""
    if os.environ.get("BENCH_GC_STATS"):
        _record_gc(os.environ["BENCH_GC_STATS"])
    if VARIANT == "ceiling":
        _made["spare"] = [connect2() for _ in range(THREADS)]
    elif VARIANT == "psycopg2":
        from psycopg2.pool import ThreadedConnectionPool

        # minconn == maxconn: putconn() closes connections above minconn.
        _made["pool"] = ThreadedConnectionPool(THREADS, THREADS, DSN, connection_factory=AutocommitConnection)
    elif VARIANT == "psycopg_pool":
        from psycopg_pool import ConnectionPool

        _made["pool"] = pool = ConnectionPool(DSN, min_size=THREADS, max_size=THREADS,
                                              kwargs={"autocommit": True}, open=True)
        pool.wait()
    elif VARIANT == "sqlalchemy":
        from sqlalchemy import create_engine

        _made["engine"] = create_engine("postgresql+psycopg2://", creator=connect2, pool_size=THREADS,
                                        max_overflow=0)


_gc: dict[str, list[float]] = {"runs": [0, 0, 0], "seconds": [0.0, 0.0, 0.0], "requests": [0]}


def _record_gc(directory: str) -> None:
    """Count the collector's runs and time per generation; write them (and the requests) at exit."""
    import atexit
    import gc
    import json
    import time

    started = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        _gc["runs"][info["generation"]] += 1
        _gc["seconds"][info["generation"]] += time.perf_counter() - started[0]

    def dump() -> None:
        with open(os.path.join(directory, f"gc-{VARIANT}-{os.getpid()}.json"), "w") as out:
            json.dump(_gc, out)

    gc.callbacks.append(on_gc)
    atexit.register(dump)


def _counting(app: Callable[[Environ, StartResponse], Iterable[bytes]]
              ) -> Callable[[Environ, StartResponse], Iterable[bytes]]:
    def counted(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        _gc["requests"][0] += 1
        return app(environ, start_response)

    return counted


def build() -> Callable[[Environ, StartResponse], Iterable[bytes]]:
    if VARIANT in ("pgpool", "pgpool_none", "pgpool_ac"):
        from pgpool_wsgi import PgPoolMiddleware

        bare = _wsgi(pgpool_view)
        options: dict[str, Any] = {"transaction": "autocommit"}
        if VARIANT == "pgpool_none":
            options["check"] = "none"
        elif VARIANT == "pgpool_ac":  # connections born in autocommit: nothing to switch per request
            options = {"connect_kwargs": {"connection_factory": AutocommitConnection}}
        wrapped = PgPoolMiddleware(bare, dsn=DSN, max_size=THREADS, exclude_paths=("/static",), **options)

        def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
            if environ.get("PATH_INFO") == "/bare":
                return bare(environ, start_response)
            return wrapped(environ, start_response)

        return app
    views: dict[str, View] = {"ceiling": ceiling_view, "psycopg2": psycopg2_view,
                              "psycopg_pool": psycopg_pool_view, "sqlalchemy": sqlalchemy_view,
                              "connect": connect_view, "pgbouncer": connect_view}
    return _wsgi(views[VARIANT])


app = _counting(build()) if os.environ.get("BENCH_GC_STATS") else build()
