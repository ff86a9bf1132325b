"""The WSGI app that tests/test_servers.py runs under gunicorn, uWSGI and waitress.

Load it as ``tests.serverapp:application`` with the repository root on the
Python path. The DSN comes from ``DATABASE_URL`` (read by the pool itself);
``SERVERAPP_MAX_SIZE`` and ``SERVERAPP_MIN_SIZE`` set the pool's ``max_size``
(default 3) and ``min_size`` (default 0).

Like a real app it uses the database while its module is imported: one query
through the pool, so under ``gunicorn --preload`` or a uWSGI master without
``lazy-apps`` the pre-forking master has used the pool before any worker
exists.

``GET /echo?token=T&sleep=S`` answers JSON: the token as PostgreSQL sent it
back, the backend pid, the pid named in the connection's
``application_name`` (the process that opened it), this worker's pid, the
pid that imported this module, a few pool counters, and the module of
psycopg2's wait callback (psycogreen's under gevent). ``/_pool`` is the
middleware's ``stats_path``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

import psycopg2.extensions

from pgpool_wsgi import PgPoolMiddleware, _forkmark

# The fork test's fallback (the pid comparison), as a kernel that refuses
# MADV_WIPEONFORK would give: set by tests/test_servers.py for some cases.
if os.environ.get("PGPOOL_TEST_FORK_CHECK") == "pid":
    _forkmark.refuse()

ECHO_SQL = "SELECT %s::text, pg_backend_pid(), current_setting('application_name'), pg_sleep(%s)"


def echo(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ.get("PATH_INFO") != "/echo":
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]
    query = parse_qs(environ.get("QUERY_STRING", ""))
    token = query.get("token", [""])[0]
    sleep = float(query.get("sleep", ["0"])[0])
    conn = environ["pgpool.conn"]
    # Seen while this request holds a connection: others waiting prove the pool was exhausted.
    stats = environ["pgpool.handle"].pool.stats()
    with conn.cursor() as cur:
        cur.execute(ECHO_SQL, (token, sleep))
        got, backend, app_name, _ = cur.fetchone()
    body = json.dumps({
        "token": got,
        "backend": backend,
        "owner": int(app_name.rsplit("=", 1)[-1]) if "pid=" in app_name else None,
        "pid": os.getpid(),
        "loaded_by": LOADED_BY,
        "waiting": stats["waiting"],
        "fork_resets": stats["fork_resets"],
        "wait_callback": _wait_callback(),
        "ssl": bool(conn.info.ssl_in_use),
        "fork_check": _forkmark.mechanism(),
    }).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def _wait_callback() -> str | None:
    """Where psycopg2's wait callback comes from (psycogreen's under gevent), if one is set."""
    callback = psycopg2.extensions.get_wait_callback()
    return None if callback is None else getattr(callback, "__module__", repr(callback))


application = PgPoolMiddleware(echo, max_size=int(os.environ.get("SERVERAPP_MAX_SIZE", "3")),
                               min_size=int(os.environ.get("SERVERAPP_MIN_SIZE", "0")),
                               timeout=20, stats_path="/_pool")

# What a real app does while loading: read something from the database.
LOADED_BY = os.getpid()
with application.pool.connection() as _conn, _conn.cursor() as _cur:
    _cur.execute("SELECT current_setting('server_version_num')::int")
    SERVER_VERSION: int = _cur.fetchone()[0]
