"""The same demo app on the naive pool: psycopg2's ThreadedConnectionPool built at import.

This is the set-up pgpool_wsgi replaces (the 2014 recipe without its pid
check): the pool is created, and used, while the app loads. Under
``gunicorn --preload`` that is in the master, so every worker inherits the
master's open connection and they all talk over one socket: crossed answers,
``no results to fetch``, ``PGRES_TUPLES_OK and no message from the libpq``,
hangs. Kept only to show the difference: ``demo.naive:application``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from psycopg2.pool import ThreadedConnectionPool

from demo.app import WSGIApp, demo_app, errors_as_500, init_db


class NaiveHandle:
    """What the views expect in ``environ["pgpool.handle"]``: ``release()``."""

    def __init__(self, pool: ThreadedConnectionPool, conn: Any) -> None:
        self.pool, self.conn = pool, conn

    def release(self) -> None:
        if self.conn is not None:
            conn, self.conn = self.conn, None
            conn.commit()
            self.pool.putconn(conn)


class NaivePoolMiddleware:
    """getconn before the app, commit and putconn after it: no fork awareness at all."""

    def __init__(self, app: WSGIApp, pool: ThreadedConnectionPool) -> None:
        self.app, self.pool = app, pool

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "").startswith("/cpu"):
            return self.app(environ, start_response)
        handle = NaiveHandle(self.pool, self.pool.getconn())
        environ["pgpool.conn"], environ["pgpool.handle"] = handle.conn, handle
        try:
            return self.app(environ, start_response)
        finally:
            if handle.conn is not None:
                handle.release()


pool = ThreadedConnectionPool(1, 4, os.environ["DATABASE_URL"])
application = errors_as_500(NaivePoolMiddleware(demo_app, pool))

conn = pool.getconn()
SERVER_VERSION = init_db(conn)
pool.putconn(conn)
