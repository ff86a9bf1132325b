"""The demo app: a small WebOb app shaped like a real one, behind a connection pool.

Views find their connection in ``environ["pgpool.conn"]`` (the pool middleware
puts it there) and never open one themselves:

* ``/`` - an HTML page that writes a row and reads a count;
* ``/echo?token=...`` - the token back through ``SELECT %s`` with the backend's
  and the worker's pid (what the load generator checks);
* ``/cpu?n=...`` - CPU work without the database (an ``exclude_paths`` prefix:
  no connection is checked out for it);
* ``/download`` - looks the file up in the database, hands the connection back
  with ``environ["pgpool.handle"].release()``, then streams a large file;
* ``/_pool`` - the middleware's ``stats_path``: this worker's pool stats.

:func:`errors_as_500` turns an exception into a 500 whose body is the error
text, so a load generator can count what went wrong.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from webob import Request, Response
from webob.dec import wsgify
from webob.exc import HTTPNotFound

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

FILE_NAME = "big.bin"
FILE_MB = int(os.environ.get("DEMO_FILE_MB", "8"))
FILE_PATH = Path(os.environ.get("DEMO_FILE", Path(tempfile.gettempdir()) / f"pgpool-demo-{os.getuid()}.bin"))

SCHEMA = """
CREATE TABLE IF NOT EXISTS visits (id bigserial PRIMARY KEY, pid int NOT NULL, at timestamptz DEFAULT now());
CREATE TABLE IF NOT EXISTS files (name text PRIMARY KEY, size bigint NOT NULL, sha256 text NOT NULL);
CREATE TABLE IF NOT EXISTS downloads (id bigserial PRIMARY KEY, name text NOT NULL, at timestamptz DEFAULT now());
"""


def make_file(path: Path = FILE_PATH, megabytes: int = FILE_MB) -> tuple[int, str]:
    """The large file ``/download`` serves (made once); its size and sha256."""
    if not path.exists() or path.stat().st_size != megabytes << 20:
        block = hashlib.sha256(b"pgpool_wsgi demo").digest() * (1 << 15)  # 1 MiB
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as out:
            for _ in range(megabytes):
                out.write(block)
        tmp.replace(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return path.stat().st_size, digest.hexdigest()


def init_db(conn: Any) -> str:
    """Create the tables and register the download; return the server version.

    Called while the app loads, as real apps do (migrations, a settings read).
    """
    size, sha = make_file()
    with conn.cursor() as cur:
        cur.execute(SCHEMA)
        cur.execute("INSERT INTO files (name, size, sha256) VALUES (%s, %s, %s) "
                    "ON CONFLICT (name) DO UPDATE SET size = excluded.size, sha256 = excluded.sha256",
                    (FILE_NAME, size, sha))
        cur.execute("SHOW server_version")
        version: str = cur.fetchone()[0]
    conn.commit()
    return version


def _json(data: dict[str, Any], status: int = 200) -> Response:
    return Response(body=json.dumps(data).encode(), status=status, content_type="application/json", charset=None)


def index(req: Request) -> Response:
    with req.environ["pgpool.conn"].cursor() as cur:
        cur.execute("INSERT INTO visits (pid) VALUES (%s)", (os.getpid(),))
        cur.execute("SELECT count(*), count(DISTINCT pid), version() FROM visits")
        visits, workers, version = cur.fetchone()
    page = (f"<!doctype html><title>pgpool_wsgi demo</title><h1>pgpool_wsgi demo</h1>"
            f"<p>{visits} visit(s) so far, from {workers} worker process(es); this page came from pid "
            f"{os.getpid()}.</p>"
            f"<p><small>{html.escape(version)}</small></p><ul>"
            "<li><a href='/echo?token=hello'>/echo</a><li><a href='/cpu?n=20000'>/cpu</a>"
            "<li><a href='/download'>/download</a><li><a href='/_pool'>/_pool</a></ul>")
    return Response(page, content_type="text/html")


def echo(req: Request) -> Response:
    with req.environ["pgpool.conn"].cursor() as cur:
        cur.execute("SELECT %s::text, pg_backend_pid()", (req.params.get("token", ""),))
        token, backend = cur.fetchone()
    return _json({"token": token, "backend": backend, "pid": os.getpid()})


def cpu(req: Request) -> Response:
    n = min(int(req.params.get("n", "20000")), 1_000_000)
    digest = b""
    for _ in range(n):
        digest = hashlib.sha256(digest).digest()
    return _json({"n": n, "sha256_chain": digest.hex(), "pid": os.getpid(),
                  "had_connection": "pgpool.conn" in req.environ})


def download(req: Request) -> Response:
    with req.environ["pgpool.conn"].cursor() as cur:
        cur.execute("SELECT size, sha256 FROM files WHERE name = %s", (FILE_NAME,))
        row = cur.fetchone()
        cur.execute("INSERT INTO downloads (name) VALUES (%s)", (FILE_NAME,))
    if row is None:
        raise HTTPNotFound()
    size, sha = row
    # Streaming takes as long as the client is slow: don't hold a connection for it.
    handle = req.environ["pgpool.handle"]
    handle.release()
    pool = getattr(handle, "pool", None)  # pgpool_wsgi's handle: show that nothing is held now
    in_use = "" if pool is None else str(pool.stats()["in_use"])
    f = open(FILE_PATH, "rb")  # noqa: SIM115 - closed by the server through the file wrapper
    wrapper = req.environ.get("wsgi.file_wrapper")
    body = wrapper(f, 1 << 16) if wrapper is not None else iter(lambda: f.read(1 << 16), b"")
    return Response(app_iter=body, content_type="application/octet-stream", content_length=size,
                    headers={"X-Sha256": sha, "X-Pool-In-Use": in_use,
                             "Content-Disposition": f"attachment; filename={FILE_NAME}"})


ROUTES: dict[str, Callable[[Request], Response]] = {"/": index, "/echo": echo, "/cpu": cpu, "/download": download}


@wsgify
def demo_app(req: Request) -> Response:
    view = ROUTES.get(req.path_info)
    if view is None:
        raise HTTPNotFound()
    return view(req)


def errors_as_500(app: WSGIApp) -> WSGIApp:
    """Answer an exception with a 500 carrying its text (one line), so clients can count errors."""

    def wrapper(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        try:
            return app(environ, start_response)
        except Exception as exc:  # noqa: BLE001 - reported to the client by design
            text = f"{type(exc).__name__}: {str(exc).strip()}".splitlines()[0]
            body = f"{text}\n".encode()
            # exc_info: the app may have called start_response before it failed.
            start_response("500 Internal Server Error",
                           [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
                           sys.exc_info())
            return [body]

    return wrapper


def app_factory(global_conf: dict[str, Any], **local_conf: Any) -> WSGIApp:
    """``paste.app_factory``: ``use = call:demo.app:app_factory``."""
    return demo_app


def errors_filter_factory(global_conf: dict[str, Any], **local_conf: Any) -> Callable[[WSGIApp], WSGIApp]:
    """``paste.filter_factory``: ``use = call:demo.app:errors_filter_factory``."""
    return errors_as_500
