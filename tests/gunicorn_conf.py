"""gunicorn settings for the server tests (``-c tests/gunicorn_conf.py``).

gevent workers need psycogreen's wait callback, or every query blocks the
whole worker. It is set after the fork, in the worker, so it also holds for
an app preloaded in the master.
"""

from __future__ import annotations

from typing import Any


def post_fork(server: Any, worker: Any) -> None:
    if server.cfg.worker_class_str == "gevent":
        from psycogreen.gevent import patch_psycopg

        patch_psycopg()
