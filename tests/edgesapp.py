"""The WSGI app tests/test_security.py runs under gunicorn and uWSGI.

Load it as ``tests.edgesapp:application`` with the repository root on the
Python path and the DSN in ``DATABASE_URL``. Log records go to stderr (the
server's captured log) as ``<time> APPLOG <LEVEL> <logger>: <message>``, so
a forged line would show as a line of its own.

* ``?dead``: through a middleware whose pool points at a closed port, so the
  request is answered 503 and the middleware logs its WARNING line naming
  the request;
* ``?hold=S``: holds a connection S seconds with ``leak_timeout`` 0.2 s, so
  the pool logs its leak warning naming the request;
* ``?pgsleep=S``: updates the row of table ``edges_lock`` (its lock held until
  the transaction ends), then ``pg_sleep(S)``;
* ``?drip``: reads the request body, then answers ``pool.stats()`` and the body as JSON;
* ``/café`` and below (``exclude_paths``): ``excluded``, no connection;
* anything else: ``SELECT 1`` and 200.

``EDGESAPP_MAX_SIZE`` / ``EDGESAPP_TIMEOUT`` / ``EDGESAPP_CHECKOUT`` set the
live pool's ``max_size`` (default 2), ``timeout`` (default 2 s) and
``checkout`` (default eager).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from pgpool_wsgi import PgPoolMiddleware

logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                    format="%(asctime)s APPLOG %(levelname)s %(name)s: %(message)s")


def view(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if "pgpool.handle" not in environ:  # an exclude_paths path
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "8")])
        return [b"excluded"]
    query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
    handle = environ["pgpool.handle"]
    got = b""
    if "drip" in query:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        got = environ["wsgi.input"].read(length)
    with handle.conn.cursor() as cur:
        cur.execute("SELECT 1")
        if "pgsleep" in query:  # lock a row, then a long query: what a killed worker leaves behind
            cur.execute("UPDATE edges_lock SET n = n + 1 WHERE id = 1")
            cur.execute("SELECT pg_sleep(%s)", (float(query["pgsleep"][0]),))
    if "hold" in query:
        time.sleep(float(query["hold"][0]))
    body = json.dumps({**handle.pool.stats(), "body": got.decode("latin-1")}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


live = PgPoolMiddleware(view, max_size=int(os.environ.get("EDGESAPP_MAX_SIZE", "2")),
                        timeout=float(os.environ.get("EDGESAPP_TIMEOUT", "2")),
                        checkout=os.environ.get("EDGESAPP_CHECKOUT", "eager"),
                        leak_timeout=0.2, stats_path="/_pool", exclude_paths=["/café"])
dead = PgPoolMiddleware(view, dsn="host=127.0.0.1 port=1 dbname=x user=x", max_size=1, timeout=1,
                        check_capacity=False, connect_timeout=2)


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ.get("QUERY_STRING", "").startswith("dead"):
        return dead(environ, start_response)
    return live(environ, start_response)
