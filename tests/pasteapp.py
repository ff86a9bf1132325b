"""A tiny app for the PasteDeploy tests: ``use = call:tests.pasteapp:app_factory``."""

from __future__ import annotations

import json
from typing import Any


def app_factory(global_conf: dict[str, Any], **local_conf: Any) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        with environ["pgpool.conn"].cursor() as cur:
            cur.execute("SELECT %s::text, pg_backend_pid()", (environ.get("QUERY_STRING", ""),))
            echo, pid = cur.fetchone()
        middleware_stats = environ["pgpool.handle"].pool.stats()
        body = json.dumps({"echo": echo, "backend": pid, "max_size": middleware_stats["max_size"],
                           "name": middleware_stats["name"]}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    return app


def replica_factory(global_conf: dict[str, Any], **local_conf: Any) -> Any:
    """Reads through the ``replica`` pool: ``environ["pgpool.replica"]``."""

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        with environ["pgpool.replica"].conn.cursor() as cur:
            cur.execute("SELECT current_user")
            user = cur.fetchone()[0]
        body = json.dumps({"replica_user": user}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    return app
