"""Paths and the stats endpoint (issue 13.7, 13.9, 15.2).

* ``exclude_paths`` match whole path segments; ``/static*`` is a plain prefix.
* Non-ASCII configured paths match WSGI's ``PATH_INFO`` (UTF-8 bytes seen as
  latin-1): in-process through webtest and under real gunicorn.
* ``stats_path`` answers GET and HEAD only (405 + ``Allow`` otherwise), and
  with ``stats_allow`` only to listed client addresses (403 otherwise).
"""

from __future__ import annotations

import http.client
import json
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import webtest

from pgpool_wsgi import ConfigError, PgPoolMiddleware
from pgpool_wsgi._paths import AddressList, PathRules
from pgpool_wsgi.config import from_strings
from tests.loadgen import fetch
from tests.pgserver import PgServer, free_port
from tests.serverctl import HOST, running

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def recorder() -> tuple[Any, list[bool]]:
    """An app recording whether each request came with a handle."""
    seen: list[bool] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append("pgpool.handle" in environ)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    return app, seen


# -- 13.9: whole segments -----------------------------------------------------------


def test_path_rules_match_segments_and_star_prefixes() -> None:
    rules = PathRules(["/cpu", "/static/", "/files*"])
    for path in ["/cpu", "/cpu/", "/cpu/x", "/static", "/static/app.js", "/files", "/files2", "/files/a"]:
        assert rules(path), path
    for path in ["/cpu_report", "/cpuinfo", "/cp", "/", "/staticx", "/x/cpu", "/fil"]:
        assert not rules(path), path
    assert PathRules(["/"])("/anything") and PathRules(["/"])("/")


def test_exclude_paths_do_not_swallow_longer_names(make_middleware: Any, dsn: str) -> None:
    app, seen = recorder()
    client = webtest.TestApp(make_middleware(app, dsn=dsn, exclude_paths=["/cpu", "/assets*"]))
    for path in ["/cpu", "/cpu/fast", "/cpu_report", "/cpuinfo", "/assets-v2/x.css", "/page"]:
        client.get(path)
    # excluded: /cpu, /cpu/fast, /assets-v2/... (star); checked out: /cpu_report, /cpuinfo, /page
    assert seen == [False, False, True, True, False, True]


def test_demo_exclude_paths_keep_the_cpu_endpoint_only() -> None:
    import configparser

    ini = configparser.ConfigParser()
    ini.read(ROOT / "demo" / "demo.ini")
    rules = PathRules(from_strings({"exclude_paths": ini["filter:pgpool"]["exclude_paths"]})["exclude_paths"])
    assert rules("/cpu") and not rules("/cpu_report") and not rules("/cpuinfo")


def test_bad_exclude_paths_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="exclude_paths"):
        PgPoolMiddleware(recorder()[0], exclude_paths=["/a*b"])
    with pytest.raises(ConfigError, match="exclude_paths"):
        PgPoolMiddleware(recorder()[0], exclude_paths=["static"])


# -- 13.7: non-ASCII paths --------------------------------------------------------------


def test_non_ascii_paths_match_wsgi_path_info(make_middleware: Any, dsn: str) -> None:
    app, seen = recorder()
    middleware = make_middleware(app, dsn=dsn, exclude_paths=["/café"], stats_path="/статистика")
    client = webtest.TestApp(middleware)
    client.get("/caf%C3%A9/menu")  # webtest hands PATH_INFO over the WSGI way: latin-1 of the bytes
    client.get("/cafe/menu")
    stats = client.get("/%D1%81%D1%82%D0%B0%D1%82%D0%B8%D1%81%D1%82%D0%B8%D0%BA%D0%B0")
    assert seen == [False, True]
    assert stats.json["checkouts"] == 1
    assert middleware.exclude_paths == ("/café",)  # shown as configured


@pytest.mark.servers
def test_non_ascii_exclude_path_under_gunicorn(pg: PgServer, tmp_path: Path) -> None:
    port = free_port()
    env = {"PYTHONPATH": str(ROOT), "DATABASE_URL": pg.dsn(), "PATH": "/usr/bin:/bin"}
    argv = [str(BIN / "gunicorn"), "--bind", f"{HOST}:{port}", "--workers", "1", "tests.edgesapp:application"]
    with running(argv, port=port, env=env, log_path=tmp_path / "server.log", cwd=ROOT):
        excluded = fetch(HOST, port, "/caf%C3%A9/menu")
        other = fetch(HOST, port, "/cafeteria")
    assert excluded[0] == 200 and excluded[2] == b"excluded"
    assert other[0] == 200 and json.loads(other[2])["checkouts"] == 1


# -- 15.2: the stats endpoint -------------------------------------------------------------


def test_stats_answers_get_and_head_only(make_middleware: Any, dsn: str) -> None:
    app, seen = recorder()
    client = webtest.TestApp(make_middleware(app, dsn=dsn, stats_path="/_pool"))
    assert client.get("/_pool").json["checkouts"] == 0
    head = client.head("/_pool")
    assert head.status_int == 200 and head.body == b""
    for method in ("POST", "DELETE", "PUT", "PATCH", "OPTIONS"):
        response = client.request("/_pool?x=1", method=method, expect_errors=True)
        assert response.status_int == 405, method
        assert response.headers["Allow"] == "GET, HEAD"
        assert b"checkouts" not in response.body
    assert seen == []  # the app never saw them


def test_stats_allow_checks_remote_addr(make_middleware: Any, dsn: str) -> None:
    app, _ = recorder()
    middleware = make_middleware(app, dsn=dsn, stats_path="/_pool", stats_allow=["127.0.0.1", "10.0.0.0/8", "::1"])
    client = webtest.TestApp(middleware)
    for addr in ["127.0.0.1", "10.1.2.3", "::1", "::ffff:127.0.0.1"]:
        assert client.get("/_pool", extra_environ={"REMOTE_ADDR": addr}).status_int == 200, addr
    for addr in ["192.168.1.1", "11.0.0.1", "::2", "", "garbage", None]:
        environ = {"REMOTE_ADDR": addr} if addr is not None else {}
        response = client.get("/_pool", extra_environ=environ, expect_errors=True)
        assert response.status_int == 403 and b"checkouts" not in response.body, addr
    # A refused client learns nothing from the method either.
    assert client.post("/_pool", extra_environ={"REMOTE_ADDR": "192.168.1.1"}, expect_errors=True).status_int == 403


def test_stats_allow_unset_allows_everyone(make_middleware: Any, dsn: str) -> None:
    client = webtest.TestApp(make_middleware(recorder()[0], dsn=dsn, stats_path="/_pool"))
    assert client.get("/_pool", extra_environ={"REMOTE_ADDR": "203.0.113.9"}).status_int == 200


@pytest.mark.parametrize("bad", [["10.0.0.0/33"], ["localhost"], ["10.0.0.1/8"], "127.0.0.1", [1], []])
def test_bad_stats_allow_is_a_config_error(bad: Any) -> None:
    with pytest.raises(ConfigError, match=r"^stats_allow: got"):
        PgPoolMiddleware(recorder()[0], stats_path="/_pool", stats_allow=bad)


def test_stats_allow_from_ini() -> None:
    assert from_strings({"stats_allow": "127.0.0.1 10.0.0.0/8\n ::1"}) == {
        "stats_allow": ("127.0.0.1", "10.0.0.0/8", "::1")}
    assert from_strings({"stats_allow": ""}) == {"stats_allow": None}
    with pytest.raises(ConfigError, match="stats_allow"):
        PgPoolMiddleware(recorder()[0], **from_strings({"stats_allow": "127.0.0.1 nope"}))


def test_address_list_ignores_other_families() -> None:
    allow = AddressList(["10.0.0.0/8"])
    assert allow.allows("10.255.0.1") and not allow.allows("::1") and not allow.allows(("10.0.0.1", 80))


# -- 15.3: slow uploads under eager checkout -------------------------------------------------


def drip_post(port: int, body: bytes, pause: float, result: dict[str, Any]) -> None:
    """POST ``body`` one byte every ``pause`` seconds; put the answer (or the error) in ``result``."""
    try:
        with socket.create_connection((HOST, port), timeout=60) as sock:
            sock.sendall(b"POST /upload?drip HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                         b"Content-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(body))
            for byte in body:
                time.sleep(pause)
                sock.sendall(bytes([byte]))
            chunks = []
            while data := sock.recv(65536):
                chunks.append(data)
        result["answer"] = b"".join(chunks)
    except OSError as exc:
        result["error"] = repr(exc)


@pytest.mark.servers
def test_slow_uploads_hold_no_connection_under_gevent(pg: PgServer, tmp_path: Path) -> None:
    """gevent, max_size=2, timeout=2: two clients drip a POST body at 1 byte/s, then 3 normal requests."""
    port = free_port()
    env = {"PYTHONPATH": str(ROOT), "DATABASE_URL": pg.dsn(), "PATH": "/usr/bin:/bin",
           "EDGESAPP_MAX_SIZE": "2", "EDGESAPP_TIMEOUT": "2"}
    argv = [str(BIN / "gunicorn"), "-c", "tests/gunicorn_conf.py", "--bind", f"{HOST}:{port}", "--workers", "1",
            "--worker-class", "gevent", "--worker-connections", "100", "tests.edgesapp:application"]
    log_path = tmp_path / "server.log"
    results: list[dict[str, Any]] = [{}, {}]
    with running(argv, port=port, env=env, log_path=log_path, cwd=ROOT):
        drippers = [threading.Thread(target=drip_post, args=(port, b"slow-body", 1.0, r), daemon=True)
                    for r in results]
        for thread in drippers:
            thread.start()
        time.sleep(2.5)  # both are mid-body now: their requests have reached the worker
        started = time.monotonic()
        normal = [fetch(HOST, port, "/normal", timeout=30) for _ in range(3)]
        print(f"\n3 normal requests while 2 uploads drip: {time.monotonic() - started:.3f} s")
        for thread in drippers:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in drippers)
    log = log_path.read_text(errors="replace")
    assert [status for status, _, _ in normal] == [200, 200, 200], (normal, log[-2000:])
    for result in results:
        answer = result.get("answer", b"")
        assert answer.startswith(b"HTTP/1.1 200") and b'"body": "slow-body"' in answer, (result, log[-2000:])
    # The startup warning: eager checkout with more concurrent requests than max_size.
    warnings = [line for line in log.splitlines() if "eager checkout" in line]
    assert len(warnings) == 1 and "worker_connections=100" in warnings[0] and "max_size=2" in warnings[0], log[-3000:]


CONCURRENCY_CASES = [
    pytest.param([str(BIN / "gunicorn"), "--workers", "1", "--threads", "4"], "gunicorn gthread threads=4",
                 id="gunicorn-gthread"),
    pytest.param([str(BIN / "uwsgi"), "--master", "--processes", "1", "--threads", "4", "--need-app",
                  "--die-on-term", "--disable-logging"], "uWSGI threads/async cores=4", id="uwsgi-threads"),
    pytest.param([str(BIN / "waitress-serve"), "--threads=4"], "waitress threads=4", id="waitress"),
    pytest.param([str(BIN / "gunicorn"), "--workers", "1"], None, id="gunicorn-sync"),
]


@pytest.mark.servers
@pytest.mark.parametrize(("argv", "expected"), CONCURRENCY_CASES)
def test_eager_concurrency_warning_reads_the_server(pg: PgServer, tmp_path: Path, argv: list[str],
                                                   expected: str | None) -> None:
    port = free_port()
    if "uwsgi" in argv[0]:
        argv = [*argv, "--http-socket", f"{HOST}:{port}", "--module", "tests.edgesapp:application"]
    elif "waitress" in argv[0]:
        argv = [*argv, f"--listen={HOST}:{port}", "tests.edgesapp:application"]
    else:
        argv = [*argv, "--bind", f"{HOST}:{port}", "tests.edgesapp:application"]
    env = {"PYTHONPATH": str(ROOT), "DATABASE_URL": pg.dsn(), "PATH": "/usr/bin:/bin", "EDGESAPP_MAX_SIZE": "2"}
    log_path = tmp_path / "server.log"
    with running(argv, port=port, env=env, log_path=log_path, cwd=ROOT):
        answers = [fetch(HOST, port, "/normal", timeout=30)[0] for _ in range(3)]
        time.sleep(0.3)
    assert answers == [200, 200, 200]
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if "eager checkout" in line]
    if expected is None:
        assert lines == []
    else:
        assert len(lines) == 1 and f"eager checkout with {expected} and max_size=2" in lines[0], lines


def test_small_bodies_are_read_before_checkout_large_and_chunked_are_not() -> None:
    from pgpool_wsgi._concurrency import BODY_LIMIT, buffer_body

    class Stream:
        def __init__(self, data: bytes) -> None:
            self.data, self.reads = data, 0

        def read(self, size: int = -1) -> bytes:
            self.reads += 1
            chunk, self.data = self.data[:size], self.data[size:]
            return chunk

    small = {"CONTENT_LENGTH": "5", "wsgi.input": Stream(b"hello")}
    buffer_body(small)
    assert small["wsgi.input"].read() == b"hello"
    for environ in ({"CONTENT_LENGTH": str(BODY_LIMIT + 1), "wsgi.input": Stream(b"x")},
                    {"CONTENT_LENGTH": "", "wsgi.input": Stream(b"x")},   # chunked: no length
                    {"CONTENT_LENGTH": "abc", "wsgi.input": Stream(b"x")},
                    {"CONTENT_LENGTH": "0", "wsgi.input": Stream(b"")}):
        stream = environ["wsgi.input"]
        buffer_body(environ)
        assert environ["wsgi.input"] is stream and stream.reads == 0


# -- 13.11: a URL DSN with percent-escapes in an ini file ---------------------------------------


def test_percent_escapes_in_an_ini_dsn_need_doubling(pg: PgServer, tmp_path: Path) -> None:
    """configparser interpolation: ``%20`` in an ini value is an error; ``%%20`` reaches libpq as ``%20``."""
    import configparser

    from paste.deploy import loadapp

    url = f"postgresql://postgres@127.0.0.1:{pg.port}/postgres?sslmode=disable&application_name=web%20app"
    ini = ("[pipeline:main]\npipeline = pgpool app\n\n[filter:pgpool]\nuse = egg:pgpool_wsgi#pgpool\n"
           "dsn = {dsn}\n\n[app:app]\nuse = call:tests.pasteapp:app_factory\n")
    single = tmp_path / "single.ini"
    single.write_text(ini.format(dsn=url))
    with pytest.raises(configparser.InterpolationSyntaxError, match="'%' must be followed by '%' or '\\('"):
        loadapp(f"config:{single}")
    doubled = tmp_path / "doubled.ini"
    doubled.write_text(ini.format(dsn=url.replace("%", "%%")))
    app = loadapp(f"config:{doubled}")
    try:
        with app.pool.connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT current_setting('application_name')")
            assert cur.fetchone()[0] == "web app"
    finally:
        app.close()


# -- 13.11: a worker killed at its timeout leaves its query running ----------------------------


def backend_state(pg: PgServer) -> tuple[bool, bool]:
    """(is a pg_sleep of ours still running?, is the edges_lock row still locked?)"""
    running_sleep = bool(pg.execute("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND "
                                    "query LIKE 'SELECT pg_sleep%%' AND application_name LIKE 'pgpool_wsgi%%'")[0][0])
    locked = bool(pg.execute("SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
                             "WHERE a.application_name LIKE 'pgpool_wsgi%%' AND l.locktype = 'transactionid'")[0][0])
    return running_sleep, locked


@pytest.mark.servers
@pytest.mark.parametrize("statement_timeout", [None, "1000"], ids=["plain", "statement_timeout"])
def test_worker_timeout_leaves_the_query_running(pg: PgServer, tmp_path: Path, statement_timeout: str | None) -> None:
    """gunicorn sync --timeout 2, a view holding a row lock in pg_sleep(8): what is left when the worker dies."""
    pg.execute("CREATE TABLE IF NOT EXISTS edges_lock (id int PRIMARY KEY, n int)")
    pg.execute("INSERT INTO edges_lock VALUES (1, 0) ON CONFLICT DO NOTHING")
    dsn = pg.dsn() if statement_timeout is None else pg.dsn(options=f"'-c statement_timeout={statement_timeout}'")
    port = free_port()
    env = {"PYTHONPATH": str(ROOT), "DATABASE_URL": dsn, "PATH": "/usr/bin:/bin"}
    argv = [str(BIN / "gunicorn"), "--bind", f"{HOST}:{port}", "--workers", "1", "--timeout", "2",
            "tests.edgesapp:application"]
    log_path = tmp_path / "server.log"
    with running(argv, port=port, env=env, log_path=log_path, cwd=ROOT):
        try:
            status: object = fetch(HOST, port, "/slow?pgsleep=8", timeout=30)[0]
        except (OSError, http.client.HTTPException) as exc:  # the worker died mid-request
            status = type(exc).__name__
        after = backend_state(pg)
        log = log_path.read_text(errors="replace")
        if statement_timeout is None:
            # The worker was killed, the client cut off; the backend still runs and holds the lock.
            assert status != 200 and "WORKER TIMEOUT" in log, (status, log[-2000:])
            assert after == (True, True)
            deadline = time.monotonic() + 30
            while backend_state(pg) != (False, False) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert backend_state(pg) == (False, False)  # until pg_sleep ends and the send fails
        else:
            # Cancelled by the server before the worker timeout: an app error, the lock released.
            assert status == 500 and "WORKER TIMEOUT" not in log, (status, log[-2000:])
            assert after == (False, False)
