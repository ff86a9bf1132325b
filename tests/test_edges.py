"""Paths and the stats endpoint (issue 13.7, 13.9, 15.2).

* ``exclude_paths`` match whole path segments; ``/static*`` is a plain prefix.
* Non-ASCII configured paths match WSGI's ``PATH_INFO`` (UTF-8 bytes seen as
  latin-1): in-process through webtest and under real gunicorn.
* ``stats_path`` answers GET and HEAD only (405 + ``Allow`` otherwise), and
  with ``stats_allow`` only to listed client addresses (403 otherwise).
"""

from __future__ import annotations

import json
import sys
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
