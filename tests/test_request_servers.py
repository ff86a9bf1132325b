"""The request flow under the real servers (issues 11.8, 13.1, 13.2, 13.4, 13.6, 13.8).

Each test starts its server as a subprocess on 127.0.0.1 with
tests/requestapp.py, and stops it (by its process group) on every path.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.loadgen import fetch
from tests.pgserver import PgServer, free_port
from tests.serverctl import HOST, Server, running

pytestmark = pytest.mark.servers

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
FILE_SIZE = 32 * 1024 * 1024  # more than loopback socket buffers hold, so a slow client makes the server wait


def _env(pg: PgServer, **options: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG") and k != "DATABASE_URL"}
    env.update(DATABASE_URL=pg.dsn(), PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env.update({f"REQUESTAPP_{k.upper()}": v for k, v in options.items()})
    return env


def _argv(server: str, app: str, port: int, *extra: str) -> list[str]:
    target = f"tests.requestapp:{app}"
    if server == "gunicorn":
        return [str(BIN / "gunicorn"), "--bind", f"{HOST}:{port}", "--workers", "1", "--graceful-timeout", "5",
                *extra, target]
    if server == "uwsgi":
        return [str(BIN / "uwsgi"), "--http-socket", f"{HOST}:{port}", "--master", "--processes", "1",
                "--module", target, "--need-app", "--die-on-term", "--disable-logging", *extra]
    return [str(BIN / "waitress-serve"), f"--listen={HOST}:{port}", "--threads=4", *extra, target]


def _serve(server: str, pg: PgServer, tmp_path: Path, app: str = "wsgi_app", extra: tuple[str, ...] = (),
           **options: str) -> contextlib.AbstractContextManager[Server]:
    port = free_port()
    return running(_argv(server, app, port, *extra), port=port, env=_env(pg, **options),
                   log_path=tmp_path / f"{server}.log", cwd=ROOT)


def _observed(port: int) -> dict[str, object]:
    status, _, body = fetch(HOST, port, "/observed")
    assert status == 200
    observed: dict[str, object] = json.loads(body)
    return observed


@pytest.fixture
def big_file(tmp_path: Path) -> Path:
    path = tmp_path / "big.bin"
    with open(path, "wb") as f:
        f.truncate(FILE_SIZE)  # sparse: cheap to make, FILE_SIZE bytes to send
    return path


@pytest.fixture
def signup(pg: PgServer) -> None:
    pg.execute("DROP TABLE IF EXISTS signup")
    pg.execute("CREATE TABLE signup (name text, CONSTRAINT signup_once UNIQUE (name) DEFERRABLE INITIALLY DEFERRED)")


def _slow_download(port: int, path: str, pause: float) -> int:
    """GET ``path``, wait ``pause`` seconds before reading, then read it all: the bytes of the body."""
    with socket.create_connection((HOST, port), timeout=60) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
        time.sleep(pause)
        data = bytearray()
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    return len(body)


# -- 13.1: uWSGI's file_wrapper is a function: the file must still go out without Python reads ------


@pytest.mark.parametrize("transaction", ["manual", "commit"])
@pytest.mark.parametrize("server_name", ["uwsgi", "gunicorn"])
def test_file_body_is_not_read_in_python(pg, tmp_path, big_file, server_name, transaction):
    with _serve(server_name, pg, tmp_path, transaction=transaction) as server:
        status, _, body = fetch(HOST, server.port, f"/file?path={big_file}", timeout=60)
        assert status == 200 and len(body) == FILE_SIZE
        observed = _observed(server.port)
        assert observed["reads"] == 0, f"the file was read in Python: {observed}"
        stats = json.loads(fetch(HOST, server.port, "/_pool")[2])
        assert stats["in_use"] == 0


# -- 13.2: waitress: a download's connection goes back on the worker thread --------------------------


def test_waitress_returns_a_downloads_connection_on_its_worker_thread(pg, tmp_path, big_file):
    with _serve("waitress", pg, tmp_path) as server:
        got = _slow_download(server.port, f"/file?path={big_file}", pause=1.0)
        assert got == FILE_SIZE
        assert fetch(HOST, server.port, "/stream?when=late")[2] == b"first chunk\n1"  # a generator body too
        threads = _observed(server.port)["putconn_threads"]
        assert threads and all(str(name).startswith("waitress-") for name in threads), threads  # type: ignore[union-attr]


# -- 13.8: waitress keeps Content-Length for a body with a length ------------------------------------


def test_waitress_sends_content_length_for_a_sized_body(pg, tmp_path):
    with _serve("waitress", pg, tmp_path) as server:
        status, headers, body = fetch(HOST, server.port, "/sized")
        lowered = {k.lower(): v for k, v in headers.items()}
        assert status == 200 and body == b"hello world\n"
        assert lowered.get("content-length") == "12" and "transfer-encoding" not in lowered, headers


# -- 13.4: commit mode: a failed commit is a 500 for Flask bodies and write(), never a false 200 ------


def _post(port: int, path: str) -> tuple[int, bytes]:
    with socket.create_connection((HOST, port), timeout=30) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
        data = bytearray()
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_gunicorn_flask_commit_failure_is_a_500(pg, tmp_path, signup):
    with _serve("gunicorn", pg, tmp_path, app="flask_app", transaction="commit") as server:
        assert _post(server.port, "/signup?name=alice") == (200, b"account created\n")
        status, body = _post(server.port, "/signup?name=alice")
        assert status == 500 and b"could not be committed" in body
        status, _, body = fetch(HOST, server.port, "/_pool")
    assert pg.execute("SELECT name FROM signup") == [("alice",)]
    log = server.log_path.read_text()
    assert "UniqueViolation" in log and "Error handling request" not in log


def test_gunicorn_write_commit_failure_is_a_500(pg, tmp_path, signup):
    with _serve("gunicorn", pg, tmp_path, transaction="commit") as server:
        status, _, body = fetch(HOST, server.port, "/write-signup?name=bob")
        assert (status, body) == (200, b"account created\n")
        status, _, body = fetch(HOST, server.port, "/write-signup?name=bob")
        assert status == 500 and b"could not be committed" in body and b"created" not in body
    assert pg.execute("SELECT name FROM signup") == [("bob",)]
    assert "Error handling request" not in server.log_path.read_text()


# -- 13.6: a lazy checkout failing inside a streaming body, under gunicorn gthread ---------------------


def test_gunicorn_gthread_pool_error_in_a_streaming_body(pg, tmp_path):
    with _serve("gunicorn", pg, tmp_path, extra=("--threads", "4"), checkout="lazy", max_size="1",
                timeout="0.2") as server:
        holder = threading.Thread(target=fetch, args=(HOST, server.port, "/hold?sleep=4"), kwargs={"timeout": 30})
        holder.start()
        try:
            deadline = time.monotonic() + 20
            while json.loads(fetch(HOST, server.port, "/_pool")[2])["in_use"] < 1:
                assert time.monotonic() < deadline, "the holding request never got its connection"
                time.sleep(0.05)
            status, headers, body = fetch(HOST, server.port, "/stream?when=early")
            assert status == 503 and {k.lower(): v for k, v in headers.items()}.get("retry-after") == "1"
            status, _, body = fetch(HOST, server.port, "/stream?when=late")
            assert status == 200 and body == b"first chunk\n"
        finally:
            holder.join(30)
        assert not holder.is_alive()
    log = server.log_path.read_text()
    assert log.count("cut short") == 1, log
    assert "Error handling request" not in log and "Traceback" not in log, log
