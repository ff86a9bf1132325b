"""Eager checkout and workers that serve more requests at once than ``max_size``.

In eager mode a request holds a connection from before the app runs until
its response is done. Two things follow under gevent, gthread, waitress or
uWSGI threads, where a worker serves more requests at once than it has
connections:

* a client uploading its body slowly would hold a connection while it drips
  (measured under gunicorn gevent, max_size 2: two clients at one byte per
  second made every other request wait out ``timeout`` and get a 503). So
  a small body (up to :data:`BODY_LIMIT`, with a ``Content-Length``) is read
  into memory *before* the checkout: the slow client holds a greenlet or a
  thread, not a connection. Larger or chunked bodies are left to the app.
* every request holds a connection while the app runs, even one that never
  queries; beyond ``max_size`` they wait. :class:`EagerGuard` says so once per
  process, at the first request, naming the server's setting.

The concurrency is read from the servers' own objects, as
:mod:`pgpool_wsgi._deploy` reads the worker count; None when it is unknown.
"""

from __future__ import annotations

import io
import logging
import sys
import threading
from typing import Any

from ._deploy import gunicorn_owner

log = logging.getLogger("pgpool_wsgi")

BODY_LIMIT = 64 * 1024  # bytes read before the checkout; larger bodies stream to the app as they come


def worker_concurrency() -> tuple[str, int] | None:
    """(what the server calls it, requests one worker process serves at once), if the server says."""
    uwsgi = sys.modules.get("uwsgi")
    if uwsgi is not None and isinstance(getattr(uwsgi, "cores", None), int):
        return "uWSGI threads/async cores", int(uwsgi.cores)
    worker = gunicorn_owner("gunicorn.workers")
    if worker is not None:
        cfg = getattr(worker, "cfg", None)
        kinds = {cls.__name__ for cls in type(worker).__mro__}
        if "ThreadWorker" in kinds and isinstance(getattr(cfg, "threads", None), int):
            return "gunicorn gthread threads", int(cfg.threads)  # type: ignore[union-attr]
        if "AsyncWorker" in kinds and isinstance(getattr(cfg, "worker_connections", None), int):
            name = getattr(cfg, "worker_class_str", "async")
            return f"gunicorn {name} worker_connections", int(cfg.worker_connections)  # type: ignore[union-attr]
        return "gunicorn sync", 1
    if "waitress" in sys.modules:
        threads = sum(1 for t in threading.enumerate() if t.name.startswith("waitress-"))
        if threads:
            return "waitress threads", threads
    return None


def buffer_body(environ: dict[str, Any]) -> None:
    """Read a small request body into memory now, so a slow upload holds no connection."""
    length = environ.get("CONTENT_LENGTH")
    if not length:
        return
    try:
        size = int(length)
    except ValueError:
        return
    stream = environ.get("wsgi.input")
    if size <= 0 or size > BODY_LIMIT or stream is None or isinstance(stream, io.BytesIO):
        return
    # A client that goes away raises here as it would in the app; no connection is held yet.
    environ["wsgi.input"] = io.BytesIO(stream.read(size))


class EagerGuard:
    """Run before each eager checkout: the once-per-process warning, then :func:`buffer_body`."""

    __slots__ = ("_max_size", "_pool_name", "pending")

    def __init__(self, pool_name: str, max_size: int) -> None:
        self._pool_name = pool_name
        self._max_size = max_size
        # The warning has not been considered yet: until then every request calls us, after it only
        # those with a CONTENT_LENGTH (the caller skips the call for the rest: no body to buffer).
        self.pending = True  # unlocked: two racing first requests may both warn, nothing worse

    def __call__(self, environ: dict[str, Any]) -> None:
        if self.pending:
            self.pending = False
            self.warn_if_oversubscribed()
        buffer_body(environ)

    def warn_if_oversubscribed(self) -> None:
        found = worker_concurrency()
        if found is None or found[1] <= self._max_size:
            return
        setting, concurrency = found
        log.warning("%s: eager checkout with %s=%d and max_size=%d: every request holds a connection "
                    "while the app runs, so beyond %d at once requests wait (up to timeout, then 503) even "
                    "if they never query; request bodies up to %d KiB are read before the checkout. "
                    "Consider checkout = lazy, or a max_size near the number of requests that query at once",
                    self._pool_name, setting, concurrency, self._max_size, self._max_size,
                    BODY_LIMIT // 1024)
