"""Log injection (issue 15.1): request-derived text we log is one printable, bounded line.

Unit tests for :mod:`pgpool_wsgi._text`, each log line that can carry request
data through the middleware in-process, and the same under real gunicorn and
uWSGI (pyuwsgi): a path with CR/LF that would forge a CRITICAL line, ESC
sequences (ANSI colour, OSC title), a 10 KB path and (uWSGI) a method with
ESC. The servers' captured log must hold no forged line and no ESC byte.
"""

from __future__ import annotations

import logging
import socket
import sys
import time
import wsgiref.util
from pathlib import Path
from typing import Any

import pytest

from pgpool_wsgi._request import RequestHandle
from pgpool_wsgi._text import for_log, request_line
from tests.pgserver import PgServer, free_port
from tests.serverctl import HOST, running

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
FORGE = "1999-01-01 00:00:00,000 APPLOG CRITICAL pgpool_wsgi: FORGED"
DEAD_DSN = "host=127.0.0.1 port=1 dbname=x user=x"


def environ_for(path: str, method: str = "GET") -> dict[str, Any]:
    environ: dict[str, Any] = {}
    wsgiref.util.setup_testing_defaults(environ)
    environ.update(PATH_INFO=path, REQUEST_METHOD=method, QUERY_STRING="")
    return environ


def one_line(text: str) -> None:
    assert text.isprintable(), repr(text)[:400]
    assert "\x1b" not in text and "\n" not in text and "\r" not in text


# -- the function -----------------------------------------------------------------


@pytest.mark.parametrize("char", [*map(chr, range(0x20)), "\x7f", *map(chr, range(0x80, 0xa0)),
                                  "\u2028", "\u2029", "\u202e", "\ufeff"])
def test_every_control_character_is_escaped(char: str) -> None:
    out = for_log(f"/a{char}b")
    one_line(out)
    assert out.startswith("/a\\") and out.endswith("b")


def test_plain_and_printable_text_is_kept() -> None:
    assert for_log("/static/app.js?v=1") == "/static/app.js?v=1"
    assert for_log("/café/menu 中") == "/café/menu 中"


def test_escapes_cannot_be_forged_with_a_backslash() -> None:
    # A literal backslash-x in the path must not read like an escaped control character.
    assert for_log("/a\\x0a") == "/a\\\\x0a"
    assert for_log("/a\n") == "/a\\x0a"


def test_length_is_capped_and_the_rest_counted() -> None:
    out = for_log("/" + "a" * 10_239)
    assert out == "/" + "a" * 199 + "…(10040 more)"
    escaped = for_log("\x1b" * 10_000)
    one_line(escaped)
    assert len(escaped) < 1000 and escaped.endswith("…(9800 more)")


def test_request_line_shows_utf8_paths_and_neutralises_method() -> None:
    # WSGI: PATH_INFO is the request's bytes decoded as latin-1.
    latin1 = "/café".encode().decode("latin-1")
    assert request_line(environ_for(latin1)) == "GET /café"
    line = request_line(environ_for("/x\r\nFORGED", method="G\x1b[31mET"))
    one_line(line)
    assert line == "G\\x1b[31mET /x\\x0d\\x0aFORGED"
    assert request_line({}) == "None "


def test_request_handle_str_is_safe(make_pool: Any) -> None:
    pool = make_pool(max_size=1)
    handle = RequestHandle(pool, "manual", environ_for("/x\r\n" + FORGE + "\x1b]0;pwned\x07" + "y" * 10_000))
    text = str(handle)
    one_line(text)
    assert text.startswith("GET /x\\x0d\\x0a1999") and "\\x1b]0;pwned\\x07" in text and "more)" in text


# -- the log lines, in-process ------------------------------------------------------


def ok_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def call(app: Any, environ: dict[str, Any]) -> str:
    statuses: list[str] = []
    result = app(environ, lambda status, headers, exc_info=None: statuses.append(status))
    try:
        b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return statuses[-1]


def assert_records_safe(records: list[logging.LogRecord], needle: str) -> None:
    mine = [r.getMessage() for r in records if r.name == "pgpool_wsgi" and needle in r.getMessage()]
    assert mine, [r.getMessage() for r in records]
    for message in mine:
        one_line(message)
        assert len(message) < 1500


def test_503_warning_is_neutralised(make_middleware: Any, pool_log: pytest.LogCaptureFixture) -> None:
    app = make_middleware(ok_app, dsn=DEAD_DSN, check_capacity=False, timeout=1)
    environ = environ_for("/x\r\n" + FORGE + "\x1b[2K" + "z" * 10_000, method="G\x1b[31mET")
    assert call(app, environ) == "503 Service Unavailable"
    assert_records_safe(pool_log.records, "503")
    assert any("\\x0d\\x0a1999" in r.getMessage() and "G\\x1b[31mET" in r.getMessage() for r in pool_log.records)


def test_leak_warning_is_neutralised(make_middleware: Any, pool_log: pytest.LogCaptureFixture, dsn: str) -> None:
    def slow(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        time.sleep(0.3)
        return ok_app(environ, start_response)

    app = make_middleware(slow, dsn=dsn, leak_timeout=0.05)
    assert call(app, environ_for("/x\n" + FORGE + "\x1b]0;pwned\x07")) == "200 OK"
    assert_records_safe(pool_log.records, "held for")


def test_commit_failed_line_is_neutralised(make_middleware: Any, pool_log: pytest.LogCaptureFixture,
                                           pg: PgServer, dsn: str) -> None:
    pg.execute("CREATE TABLE IF NOT EXISTS edges_parent (id int PRIMARY KEY)")
    pg.execute("CREATE TABLE IF NOT EXISTS edges_child (parent int REFERENCES edges_parent "
               "DEFERRABLE INITIALLY DEFERRED)")

    def orphan(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        with environ["pgpool.conn"].cursor() as cur:
            cur.execute("INSERT INTO edges_child VALUES (42)")  # fails only at commit
        return ok_app(environ, start_response)

    app = make_middleware(orphan, dsn=dsn, transaction="commit")
    assert call(app, environ_for("/x\r\n" + FORGE + "\x1b[31m")).startswith("500")
    assert_records_safe(pool_log.records, "commit failed")


# -- under real servers -------------------------------------------------------------


def raw_request(port: int, request_line_bytes: bytes, timeout: float = 20.0) -> bytes:
    """Send one HTTP/1.0 request with exactly these request-line bytes; the whole answer."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(request_line_bytes + b"\r\nHost: x\r\nConnection: close\r\n\r\n")
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


def server_command(server: str, port: int) -> list[str]:
    if server == "gunicorn":
        # --limit-request-line 0: a 10 KB path reaches the app instead of gunicorn's 414.
        return [str(BIN / "gunicorn"), "--bind", f"{HOST}:{port}", "--workers", "1", "--limit-request-line", "0",
                "--graceful-timeout", "3", "tests.edgesapp:application"]
    return [str(BIN / "uwsgi"), "--http-socket", f"{HOST}:{port}", "--master", "--processes", "1",
            "--module", "tests.edgesapp:application", "--need-app", "--die-on-term", "--buffer-size", "32768",
            # uWSGI's own request log writes the method raw (its defect, see the README's Security section).
            "--disable-logging"]


def server_env(pg: PgServer) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("PG") and k != "DATABASE_URL"}
    env.update(DATABASE_URL=pg.dsn(), PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return env


@pytest.mark.servers
@pytest.mark.parametrize("server", ["gunicorn", "uwsgi"])
def test_no_forged_log_line_under_a_real_server(pg: PgServer, tmp_path: Path, server: str) -> None:
    port = free_port()
    log_path = tmp_path / "server.log"
    forge = FORGE.replace(" ", "%20").encode()
    sent = [
        b"GET /x%0d%0a" + forge + b"%1b[2K%1b[31mRED?dead HTTP/1.0",  # CR LF + ANSI: the 503 line
        b"GET /y%0a" + forge + b"%1b]0;pwned%07?hold=0.5 HTTP/1.0",   # LF + OSC: the leak warning
        b"GET /" + b"w" * 10_240 + b"%1b?dead HTTP/1.0",               # 10 KB path
    ]
    if server == "uwsgi":  # gunicorn refuses such a method itself (400) before any app runs
        sent.append(b"G\x1b[31mET /m?dead HTTP/1.0")
    with running(server_command(server, port), port=port, env=server_env(pg), log_path=log_path, cwd=ROOT):
        answers = [raw_request(port, line) for line in sent]
        time.sleep(0.5)  # the log lines are written by now; give the pipe a moment
    statuses = [answer.split(b"\r\n", 1)[0] for answer in answers]
    assert b"503" in statuses[0] and b"200" in statuses[1] and b"503" in statuses[2], statuses
    if server == "uwsgi":
        assert b"503" in statuses[3], statuses
    raw = log_path.read_bytes()
    assert b"\x1b" not in raw, raw[-3000:]
    lines = raw.decode("utf-8", "replace").splitlines()
    ours = [line for line in lines if "APPLOG WARNING pgpool_wsgi:" in line]
    # Every FORGED text sits inside one of our lines, escaped; none starts a line of its own.
    assert all("APPLOG WARNING" in line for line in lines if "FORGED" in line), raw[-3000:]
    assert not any(line.lstrip().startswith(("1999-01-01", "FORGED")) for line in lines)
    assert sum("\\x0d\\x0a1999-01-01" in line for line in ours) == 1, ours
    assert sum("held for" in line and "\\x0a1999-01-01" in line and "\\x1b]0;pwned\\x07" in line
               for line in ours) == 1, ours
    long_lines = [line for line in ours if "/www" in line]
    assert len(long_lines) == 1 and "more)" in long_lines[0] and len(long_lines[0]) < 1000, long_lines
    if server == "uwsgi":
        assert any("G\\x1b[31mET /m" in line for line in ours), ours
