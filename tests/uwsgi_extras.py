"""An app for tests/test_deploy.py: a pool used in the uWSGI master, then in a mule and a spooler.

Load it as ``tests.uwsgi_extras:application`` with the repository root on the
Python path. The pool is built (and queried once) while the master imports
the module, as an app that checks its database at startup would. A mule
(``--mule=tests/uwsgi_mule.py``) and the spooler (``GET /spool`` enqueues a
task) each make ``CHECKOUTS`` checkouts and write this process's
``pool.stats()`` as JSON to ``$EXTRAS_RESULTS/<role>.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import uwsgi  # type: ignore[import-not-found]  # only under uWSGI

from pgpool_wsgi import ConnectionPool

CHECKOUTS = 20

pool = ConnectionPool(max_size=2, name="extras")  # DATABASE_URL
with pool.connection() as conn, conn.cursor() as cur:
    cur.execute("SELECT 1")


def run_checkouts(role: str) -> None:
    """``CHECKOUTS`` checkouts, one query each; then the stats, written atomically."""
    for _ in range(CHECKOUTS):
        with pool.connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
    stats = pool.stats()
    stats["role_pid"] = os.getpid()
    results = Path(os.environ["EXTRAS_RESULTS"])
    partial = results / f"{role}.json.part"
    partial.write_text(json.dumps(stats))
    partial.rename(results / f"{role}.json")


def spooler(env: dict[bytes, bytes]) -> int:
    run_checkouts("spooler")
    return int(uwsgi.SPOOL_OK)


uwsgi.spooler = spooler


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ.get("PATH_INFO") == "/spool":
        uwsgi.spool({b"task": b"checkouts"})
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok\n"]
