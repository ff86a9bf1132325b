"""PgPoolMiddleware against the real server (SPEC R1-R7, C2, C3)."""

from __future__ import annotations

import gc
import io
import json
import logging
import threading
import time
import weakref
import wsgiref.util
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.validate import validator

import psycopg2
import pytest
import webtest

from pgpool_wsgi import ConfigError, PgPoolMiddleware, PoolClosed

# R7: the validator's warnings count as failures too.
pytestmark = pytest.mark.filterwarnings("error::wsgiref.validate.WSGIWarning")

App = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def make_environ(path: str = "/", method: str = "GET", **extra: Any) -> dict[str, Any]:
    environ: dict[str, Any] = {}
    wsgiref.util.setup_testing_defaults(environ)
    environ.update({"PATH_INFO": path, "REQUEST_METHOD": method, "QUERY_STRING": "",
                    "wsgi.file_wrapper": wsgiref.util.FileWrapper}, **extra)
    return environ


class Response:
    def __init__(self) -> None:
        self.status: str | None = None
        self.headers: list[tuple[str, str]] = []
        self.calls = 0

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        if self.calls and exc_info is None:
            raise AssertionError("start_response called twice without exc_info")
        self.calls += 1
        self.status, self.headers = status, headers
        return lambda data: None

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


def serve(app: App, environ: dict[str, Any] | None = None, *, read: int | None = None) -> tuple[Response, bytes]:
    """What a server does: call, iterate (all, or ``read`` chunks), always close."""
    response = Response()
    result = app(environ or make_environ(), response.start_response)
    body = b""
    try:
        for n, chunk in enumerate(result):
            if read is not None and n >= read:
                break
            body += chunk
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return response, body


def query(conn: Any, sql: str, params: tuple[Any, ...] | None = None) -> Any:
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchone()[0]


@pytest.fixture
def mw(dsn: str, make_middleware: Callable[..., PgPoolMiddleware]) -> Callable[..., PgPoolMiddleware]:
    """make_middleware with the session server's DSN unless told otherwise."""
    return lambda app, **options: make_middleware(app, **{"dsn": dsn, **options})


# -- R1: the connection is there before the app runs ---------------------------


def test_connection_and_handle_are_in_environ(mw):
    seen: dict[str, Any] = {}

    def app(environ, start_response):
        conn = environ["pgpool.conn"]
        seen["same"] = conn is environ["pgpool.handle"].conn
        seen["value"] = query(conn, "SELECT 'hello'")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [seen["value"].encode()]

    middleware = mw(app)
    res = webtest.TestApp(middleware).get("/")
    assert res.text == "hello" and seen["same"] is True
    assert middleware.pool.stats()["in_use"] == 0
    assert middleware.pool is middleware.pool  # the attribute exists and is stable


# -- R2 + R7: returned exactly once on every path, PEP 3333 clean ----------------


class Boom(Exception):
    pass


def list_body(environ, start_response):
    query(environ["pgpool.conn"], "SELECT 1")
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"list"]


def generator_body(environ, start_response):
    conn = environ["pgpool.conn"]
    start_response("200 OK", [("Content-Type", "text/plain")])

    def body():
        for i in range(3):
            yield str(query(conn, "SELECT %s", (i,))).encode()

    return body()


def generator_raises(environ, start_response):
    conn = environ["pgpool.conn"]
    start_response("200 OK", [("Content-Type", "text/plain")])

    def body():
        yield str(query(conn, "SELECT 1")).encode()
        raise Boom("mid-body")

    return body()


def raises_before_start(environ, start_response):
    query(environ["pgpool.conn"], "SELECT 1")
    raise Boom("before start_response")


def raises_after_start(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    query(environ["pgpool.conn"], "SELECT 1")
    raise Boom("after start_response")


def long_generator(environ, start_response):
    conn = environ["pgpool.conn"]
    start_response("200 OK", [("Content-Type", "text/plain")])
    return (str(query(conn, "SELECT %s", (i,))).encode() for i in range(1000))


def file_wrapper_body(environ, start_response):
    query(environ["pgpool.conn"], "SELECT 1")
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return environ["wsgi.file_wrapper"](io.BytesIO(b"x" * 50000), 8192)


PATHS = [
    pytest.param(list_body, None, None, b"list", id="list-body"),
    pytest.param(generator_body, None, None, b"012", id="generator-read-fully"),
    pytest.param(generator_raises, None, Boom, None, id="generator-raises-mid-way"),
    pytest.param(raises_before_start, None, Boom, None, id="app-raises-before-start_response"),
    pytest.param(raises_after_start, None, Boom, None, id="app-raises-after-start_response"),
    pytest.param(long_generator, 2, None, b"01", id="client-went-away"),
    pytest.param(file_wrapper_body, None, None, b"x" * 50000, id="wsgi.file_wrapper"),
]


@pytest.mark.parametrize("transaction", ["manual", "commit", "autocommit"])
@pytest.mark.parametrize(("app", "read", "error", "body"), PATHS)
def test_connection_returned_exactly_once_on_every_path(mw, monkeypatch, app, read, error, body, transaction):
    middleware = mw(validator(app), transaction=transaction)
    pool = middleware.pool
    returns: list[Any] = []
    real_putconn = pool.putconn
    monkeypatch.setattr(pool, "putconn", lambda conn, **kw: (returns.append(conn), real_putconn(conn, **kw)))
    wrapped = validator(middleware)
    if error is None:
        response, got = serve(wrapped, read=read)
        assert got == body and response.status == "200 OK"
    else:
        with pytest.raises(error):
            serve(wrapped, read=read)
    assert len(returns) == 1
    stats = pool.stats()
    assert stats["in_use"] == 0 and stats["idle"] == 1 and stats["discarded"] == 0


@pytest.mark.parametrize("transaction", ["manual", "commit", "autocommit"])
def test_file_wrapper_keeps_the_servers_object_and_the_connection_is_back(mw, transaction):
    made: list[Any] = []

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        filelike = io.BytesIO(b"data")
        made.extend([environ["wsgi.file_wrapper"](filelike), filelike])
        return made[0]

    middleware = mw(app, transaction=transaction)
    response = Response()
    environ = make_environ()
    result = middleware(environ, response.start_response)
    assert environ["wsgi.file_wrapper"] is wsgiref.util.FileWrapper  # gunicorn tests isinstance(result, it)
    # The server's own object, untouched, so it may sendfile() it; no database work is left for close().
    assert result is made[0] and type(result) is wsgiref.util.FileWrapper and result.close == made[1].close
    assert response.status == "200 OK"
    assert middleware.pool.stats()["in_use"] == 0
    assert b"".join(result) == b"data"
    result.close()
    assert middleware.pool.stats()["in_use"] == 0 and middleware.pool.stats()["checkouts"] == 1


def test_generator_holds_the_connection_until_close(mw):
    middleware = mw(generator_body)
    response = Response()
    result = middleware(make_environ(), response.start_response)
    assert b"".join(result) == b"012"
    assert middleware.pool.stats()["in_use"] == 1  # not done until close()
    result.close()
    assert middleware.pool.stats()["in_use"] == 0


def test_validator_clean_on_the_503(mw):
    middleware = mw(validator(list_body), max_size=1, timeout=0.05)
    holder = middleware.pool.getconn()
    response, _body = serve(validator(middleware))
    assert response.status == "503 Service Unavailable"
    middleware.pool.putconn(holder)


# -- R3: release(), lazy mode, exclude_paths -----------------------------------------


def test_release_returns_early_and_commits_in_commit_mode(pg, mw):
    pg.execute("CREATE TABLE IF NOT EXISTS release_test (v text)")
    pg.execute("TRUNCATE release_test")
    states: list[int] = []

    def app(environ, start_response):
        conn = environ["pgpool.conn"]
        with conn.cursor() as cur:
            cur.execute("INSERT INTO release_test VALUES ('streamed')")
        environ["pgpool.handle"].release()
        states.append(middleware.pool.stats()["in_use"])
        assert "pgpool.conn" not in environ
        start_response("200 OK", [("Content-Type", "text/plain")])
        return (b"chunk" for _ in range(3))

    middleware = mw(app, transaction="commit")
    _response, body = serve(validator(middleware))
    assert body == b"chunk" * 3 and states == [0]
    assert pg.execute("SELECT v FROM release_test") == [("streamed",)]


def test_release_in_manual_mode_rolls_back(pg, mw):
    pg.execute("CREATE TABLE IF NOT EXISTS release_manual (v text)")
    pg.execute("TRUNCATE release_manual")

    def app(environ, start_response):
        with environ["pgpool.conn"].cursor() as cur:
            cur.execute("INSERT INTO release_manual VALUES ('x')")
        environ["pgpool.handle"].release()
        environ["pgpool.handle"].release()  # twice is harmless
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    middleware = mw(app)
    serve(validator(middleware))
    assert pg.execute("SELECT count(*) FROM release_manual") == [(0,)]
    assert middleware.pool.stats()["checkouts"] == 1 and middleware.pool.stats()["in_use"] == 0


def test_lazy_mode_checks_out_only_on_use(mw):
    def app(environ, start_response):
        assert "pgpool.conn" not in environ
        handle = environ["pgpool.handle"]
        if environ["PATH_INFO"] == "/db":
            query(handle.conn, "SELECT 1")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    middleware = mw(app, checkout="lazy")
    client = webtest.TestApp(middleware)
    client.get("/nodb")
    assert middleware.pool.stats()["checkouts"] == 0
    client.get("/db")
    assert middleware.pool.stats()["checkouts"] == 1 and middleware.pool.stats()["in_use"] == 0


def test_lazy_checkout_failure_becomes_503(mw):
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        environ["pgpool.handle"].conn  # noqa: B018 - the lazy checkout times out
        return [b"unreachable"]

    middleware = mw(app, checkout="lazy", max_size=1, timeout=0.05)
    holder = middleware.pool.getconn()
    response, _body = serve(validator(middleware))
    assert response.status.startswith("503") and response.header("Retry-After") == "1"
    middleware.pool.putconn(holder)


def test_excluded_paths_never_check_out(mw):
    keys: list[set[str]] = []

    def app(environ, start_response):
        keys.append({k for k in environ if k.startswith("pgpool.")})
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    middleware = mw(app, exclude_paths=["/static/", "/health"])
    client = webtest.TestApp(middleware)
    client.get("/static/app.css")
    client.get("/health/live")  # a whole segment below /health (not /healthz)
    client.get("/page")
    assert keys == [set(), set(), {"pgpool.conn", "pgpool.handle"}]
    assert middleware.pool.stats()["checkouts"] == 1

    lazy = mw(app, checkout="lazy", exclude_paths=["/static/"])
    keys.clear()
    webtest.TestApp(lazy).get("/static/x")
    webtest.TestApp(lazy).get("/page")
    assert keys == [set(), {"pgpool.handle"}]


# -- R4: transaction modes ------------------------------------------------------


@pytest.fixture
def table(pg):
    pg.execute("CREATE TABLE IF NOT EXISTS tx_test (v text UNIQUE DEFERRABLE INITIALLY DEFERRED)")
    pg.execute("TRUNCATE tx_test")
    return lambda: sorted(r[0] for r in pg.execute("SELECT v FROM tx_test"))


def inserting_app(status: str = "200 OK", *, raise_after: bool = False, values: tuple[str, ...] = ("a",),
                  commit: bool = False, generator: bool = False) -> App:
    def app(environ, start_response):
        conn = environ["pgpool.conn"]
        with conn.cursor() as cur:
            for value in values:
                cur.execute("INSERT INTO tx_test VALUES (%s)", (value,))
        if commit:
            conn.commit()
        if raise_after:
            raise Boom("after the insert")
        start_response(status, [("Content-Type", "text/plain")])
        return (b"x" for _ in range(2)) if generator else [b"x"]

    return app


@pytest.mark.parametrize(
    ("mode", "app", "expect_status", "rows"),
    [
        pytest.param("manual", inserting_app(), "200 OK", [], id="manual-uncommitted-rolled-back"),
        pytest.param("manual", inserting_app(commit=True), "200 OK", ["a"], id="manual-app-commits"),
        pytest.param("commit", inserting_app(), "200 OK", ["a"], id="commit-list-200"),
        pytest.param("commit", inserting_app(generator=True), "200 OK", ["a"], id="commit-generator-200"),
        pytest.param("commit", inserting_app("404 Not Found"), "404 Not Found", [], id="commit-404-rolls-back"),
        pytest.param("commit", inserting_app("500 Oops"), "500 Oops", [], id="commit-500-rolls-back"),
        pytest.param("commit", inserting_app(raise_after=True), Boom, [], id="commit-exception-rolls-back"),
        pytest.param("autocommit", inserting_app(raise_after=True), Boom, ["a"], id="autocommit-kept-despite-error"),
    ],
)
def test_transaction_modes(mw, table, mode, app, expect_status, rows):
    middleware = mw(validator(app), transaction=mode)
    if isinstance(expect_status, str):
        response, _ = serve(validator(middleware))
        assert response.status == expect_status
    else:
        with pytest.raises(expect_status):
            serve(validator(middleware))
    assert table() == rows
    assert middleware.pool.stats()["in_use"] == 0


def test_commit_failure_on_a_list_body_is_a_500_not_a_false_200(mw, table, pool_log):
    # The app returns a plain list (no inner validator, which would hide it).
    middleware = mw(inserting_app(values=("dup", "dup")), transaction="commit")
    response, body = serve(validator(middleware))
    assert response.status == "500 Internal Server Error"
    assert b"could not be committed" in body
    assert table() == []
    assert any("commit failed" in r.getMessage() for r in pool_log.records)
    assert middleware.pool.stats()["in_use"] == 0


def test_autocommit_mode_is_undone_for_the_next_request(make_pool):
    seen: list[bool] = []

    def app(environ, start_response):
        seen.append(environ["pgpool.conn"].autocommit)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b""]

    # With a pool of your own, autocommit is switched on for the request only.
    own_pool = make_pool(max_size=1)
    auto = PgPoolMiddleware(app, pool=own_pool, transaction="autocommit")
    serve(auto)
    conn = own_pool.getconn()
    assert conn.autocommit is False and seen == [True]
    own_pool.putconn(conn)


# -- R5: no state crosses requests ------------------------------------------------------


def test_session_state_and_open_transactions_do_not_cross_requests(mw):
    seen: list[tuple[Any, ...]] = []

    def app(environ, start_response):
        conn = environ["pgpool.conn"]
        with conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid(), current_setting('work_mem'), "
                        "current_setting('search_path'), txid_current_if_assigned()")
            seen.append(cur.fetchone())
            if environ["PATH_INFO"] == "/dirty":
                cur.execute("SET work_mem = '9MB'")
                cur.execute("SET SESSION search_path = 'elsewhere'")
                cur.execute("CREATE TEMP TABLE IF NOT EXISTS t (v int)")
                cur.execute("INSERT INTO t VALUES (1)")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    middleware = mw(app, max_size=1)
    client = webtest.TestApp(middleware)
    client.get("/dirty")
    client.get("/clean")
    (pid1, mem1, path1, _), (pid2, mem2, path2, txid2) = seen
    assert pid1 == pid2  # the same backend served both
    assert (mem2, path2) == (mem1, path1) == ("4MB", '"$user", public')
    assert txid2 is None


def test_reset_sql_discard_all_through_the_middleware(mw):
    seen: list[tuple[Any, ...]] = []

    def app(environ, start_response):
        conn = environ["pgpool.conn"]
        with conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid(), current_setting('work_mem')")
            seen.append(cur.fetchone())
            cur.execute("SET work_mem = '9MB'")
        conn.commit()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    middleware = mw(app, max_size=1, reset_sql="DISCARD ALL")
    client = webtest.TestApp(middleware)
    client.get("/")
    client.get("/")
    assert seen[0] == seen[1] and seen[0][1] == "4MB"


# -- R6: broken connections never go back to idle -----------------------------------------


def test_backend_terminated_mid_request_then_next_request_succeeds(pg, mw):
    killer_done = threading.Event()

    def app(environ, start_response):
        conn = environ["pgpool.conn"]
        if environ["PATH_INFO"] == "/slow":
            pid = query(conn, "SELECT pg_backend_pid()")
            threading.Timer(0.3, lambda: (pg.execute("SELECT pg_terminate_backend(%s)", (pid,)),
                                          killer_done.set())).start()
            query(conn, "SELECT pg_sleep(10)")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(query(conn, "SELECT pg_backend_pid()")).encode()]

    middleware = mw(app, max_size=1)
    with pytest.raises(psycopg2.OperationalError):
        serve(validator(middleware), make_environ("/slow"))
    assert killer_done.wait(10)
    response, body = serve(validator(middleware), make_environ("/next"))
    assert response.status == "200 OK" and int(body) > 0
    stats = middleware.pool.stats()
    assert stats["discarded"] == 1 and stats["connects"] == 2 and stats["in_use"] == 0


def test_base_exception_discards_the_connection(mw):
    class Interrupt(BaseException):
        pass

    def app(environ, start_response):
        query(environ["pgpool.conn"], "SELECT 1")
        raise Interrupt

    middleware = mw(app)
    with pytest.raises(Interrupt):
        serve(middleware)
    assert middleware.pool.stats()["discarded"] == 1 and middleware.pool.stats()["size"] == 0


def test_nothing_logged_per_request_at_info(mw, caplog):
    middleware = mw(list_body)
    caplog.set_level(logging.INFO, logger="pgpool_wsgi")
    client = webtest.TestApp(middleware)
    for _ in range(20):
        client.get("/")
    assert caplog.records == []
    assert middleware.pool.stats()["checkouts"] == 20


# -- C2 / C3: exhaustion --------------------------------------------------------------------


def test_third_concurrent_request_gets_503_after_timeout(mw, pool_log):
    release = threading.Event()
    entered = threading.Semaphore(0)

    def app(environ, start_response):
        query(environ["pgpool.conn"], "SELECT 1")
        entered.release()
        release.wait(20)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"done"]

    middleware = mw(app, max_size=2, timeout=0.5, retry_after=3)
    results: list[tuple[str | None, bytes]] = []

    def request() -> None:
        response, body = serve(middleware)
        results.append((response.status, body))

    holders = [threading.Thread(target=request) for _ in range(2)]
    for t in holders:
        t.start()
    assert entered.acquire(timeout=10) and entered.acquire(timeout=10)
    response = webtest.TestApp(middleware).get("/", status=503)
    started = time.monotonic()
    response = webtest.TestApp(middleware).get("/", status=503)
    waited = time.monotonic() - started
    release.set()
    for t in holders:
        t.join(10)
    assert 0.4 <= waited < 5
    assert response.headers["Retry-After"] == "3"
    assert response.content_type == "text/plain" and len(response.body) < 200
    assert sorted(results) == [("200 OK", b"done")] * 2
    assert middleware.pool.stats()["timeouts"] == 2
    warnings = [r for r in pool_log.records if r.levelname == "WARNING" and "503" in r.getMessage()]
    assert len(warnings) == 2


def test_closed_pool_answers_503(mw):
    middleware = mw(list_body)
    middleware.pool.close()
    response, _body = serve(validator(middleware))
    assert response.status.startswith("503")
    with pytest.raises(PoolClosed):
        middleware.pool.getconn()


# -- stats, construction ------------------------------------------------------------------


def test_stats_path_serves_json_only_when_configured(mw):
    with_stats = webtest.TestApp(mw(list_body, stats_path="/_pool"))
    with_stats.get("/")
    stats = with_stats.get("/_pool").json
    assert stats["checkouts"] == 1 and stats["in_use"] == 0 and "fork_resets" in stats
    assert json.dumps(stats)

    seen_paths: list[str] = []

    def app(environ, start_response):
        seen_paths.append(environ["PATH_INFO"])
        return list_body(environ, start_response)

    without = webtest.TestApp(mw(app))
    without.get("/_pool")
    assert seen_paths == ["/_pool"]


def test_pool_option_with_pool_argument_is_a_config_error(make_pool):
    pool = make_pool()
    with pytest.raises(ConfigError, match="max_size"):
        PgPoolMiddleware(list_body, pool=pool, max_size=3)
    middleware = PgPoolMiddleware(list_body, pool=pool, transaction="commit", stats_path="/s")
    assert middleware.pool is pool and middleware.transaction == "commit"
    with pytest.raises(ConfigError, match="transaction: got 'comit'"):
        PgPoolMiddleware(list_body, pool=pool, transaction="comit")
    with pytest.raises(ConfigError, match="checkuot: unknown option; did you mean 'checkout'"):
        PgPoolMiddleware(list_body, pool=pool, checkuot="lazy")


# -- named pools -------------------------------------------------------------------------


def test_named_pool_is_a_lazy_handle_returned_with_the_request(pg, mw, make_pool):
    replica_pool = make_pool(dsn=pg.dsn(user="app"), name="replica", max_size=2)
    seen: list[str] = []

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/read":
            seen.append(query(environ["pgpool.replica"].conn, "SELECT current_user"))
        seen.append(query(environ["pgpool.conn"], "SELECT current_user"))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return (b"x" for _ in range(2))

    middleware = mw(app, pools={"replica": replica_pool, "archive": {"dsn": pg.dsn(), "max_size": 1}})
    archive = middleware.pools["archive"]
    assert archive.name == "archive" and archive.max_size == 1
    client = webtest.TestApp(middleware)
    client.get("/write")
    assert replica_pool.stats()["checkouts"] == 0
    client.get("/read")
    assert seen == ["postgres", "app", "postgres"]
    assert replica_pool.stats()["checkouts"] == 1 and replica_pool.stats()["in_use"] == 0
    assert archive.stats()["checkouts"] == 0
    middleware.close()
    assert archive.closed


def test_named_pools_commit_together_in_commit_mode(pg, mw, make_pool, table):
    pg.execute("CREATE TABLE IF NOT EXISTS tx_other (v text)")
    pg.execute("TRUNCATE tx_other")
    other = make_pool(name="other")

    def app(environ, start_response):
        with environ["pgpool.conn"].cursor() as cur:
            cur.execute("INSERT INTO tx_test VALUES ('main')")
        with environ["pgpool.other"].conn.cursor() as cur:
            cur.execute("INSERT INTO tx_other VALUES ('other')")
        start_response(environ["QUERY_STRING"] or "200 OK", [("Content-Type", "text/plain")])
        return (b"x" for _ in range(2))

    middleware = mw(validator(app), transaction="commit", pools={"other": other})
    serve(validator(middleware), make_environ(QUERY_STRING="500 Failed"))
    assert table() == [] and pg.execute("SELECT count(*) FROM tx_other") == [(0,)]
    serve(validator(middleware))
    assert table() == ["main"] and pg.execute("SELECT v FROM tx_other") == [("other",)]
    assert other.stats()["in_use"] == 0 and middleware.pool.stats()["in_use"] == 0


def test_named_pool_option_errors_name_pool_and_key(mw):
    with pytest.raises(ConfigError, match=r"^replica\.max_size: got 0"):
        PgPoolMiddleware(list_body, pools={"replica": {"max_size": 0}})
    with pytest.raises(ConfigError, match=r"^pools: got"):
        PgPoolMiddleware(list_body, pools={"conn": {}})


# -- memory -------------------------------------------------------------------------------


class _Marker:
    pass


def no_db_body(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"no database"]


@pytest.mark.parametrize(
    ("app", "options"),
    [
        pytest.param(list_body, {}, id="list-body"),
        pytest.param(generator_body, {}, id="generator-body"),
        pytest.param(no_db_body, {"checkout": "lazy"}, id="lazy-unused"),
        pytest.param(generator_body, {"transaction": "commit"}, id="commit-generator"),
        pytest.param(list_body, {"pools": {"other": {"max_size": 1}}}, id="named-pools"),
    ],
)
def test_a_finished_request_is_freed_without_the_cycle_collector(mw, dsn, app, options):
    if "pools" in options:
        options = {"pools": {"other": {"dsn": dsn, "max_size": 1}}}
    middleware = mw(app, **options)
    serve(middleware)  # warm up: the first request opens the connection
    gc.collect()
    gc.disable()
    try:
        marker = _Marker()
        ref = weakref.ref(marker)
        environ = make_environ()
        environ["test.marker"] = marker
        del marker
        serve(middleware, environ)
        del environ
        assert ref() is None, "the request's environ outlived it (a reference cycle)"
    finally:
        gc.enable()
    assert middleware.pool.stats()["in_use"] == 0


def test_autocommit_mode_keeps_autocommit_as_the_resting_state(mw, make_pool):
    seen: list[bool] = []

    def app(environ, start_response):
        seen.append(environ["pgpool.conn"].autocommit)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b""]

    configured: list[bool] = []
    auto = mw(app, transaction="autocommit", max_size=1, configure=lambda conn: configured.append(conn.autocommit))
    serve(auto)
    serve(auto)
    conn = auto.pool.getconn()
    assert seen == [True, True] and conn.autocommit is True and configured == [True]
    auto.pool.putconn(conn)
    assert auto.pool.stats()["connects"] == 1 and auto.pool.stats()["discarded"] == 0
