"""gunicorn settings for the demo: ``gunicorn -c demo/gunicorn.conf.py`` from the repository root.

``DATABASE_URL`` holds the connection string. ``preload_app`` is safe with
pgpool_wsgi: the app (and its query at load time) runs once in the master,
the master keeps no connection, each worker opens its own.
"""

from __future__ import annotations

import os
from typing import Any

wsgi_app = "demo.wsgi:application"
bind = os.environ.get("DEMO_BIND", "127.0.0.1:8000")
workers = 4
worker_class = "sync"  # or "gthread" with threads = 8, or "gevent" (see post_fork)
preload_app = True
timeout = 30
graceful_timeout = 5


def post_fork(server: Any, worker: Any) -> None:
    # gevent workers need psycogreen's wait callback, or each query blocks the
    # whole worker. Set it in the worker, after the fork.
    if server.cfg.worker_class_str == "gevent":
        from psycogreen.gevent import patch_psycopg

        patch_psycopg()
