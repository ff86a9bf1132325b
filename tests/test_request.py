"""The request flow in-process against the real server: modes, handles, errors, sub-requests (issues 11, 13, 16)."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any
from wsgiref.validate import validator

import flask
import psycopg2
import pytest
import webob
import webtest
from pyramid.config import Configurator
from pyramid.response import Response as PyramidResponse

from pgpool_wsgi import ConnectionPool, PgPoolMiddleware, PoolError
from tests.test_middleware import Response, make_environ, query, serve

pytestmark = pytest.mark.filterwarnings("error::wsgiref.validate.WSGIWarning")

MODES = ["manual", "commit", "autocommit"]


@pytest.fixture
def mw(dsn: str, make_middleware: Callable[..., PgPoolMiddleware]) -> Callable[..., PgPoolMiddleware]:
    return lambda app, **options: make_middleware(app, **({"dsn": dsn} if "pool" not in options else {}), **options)


@pytest.fixture
def rows(pg: Any) -> Callable[[], list[str]]:
    pg.execute("CREATE TABLE IF NOT EXISTS req_rows (v text)")
    pg.execute("TRUNCATE req_rows")
    return lambda: sorted(r[0] for r in pg.execute("SELECT v FROM req_rows"))


@pytest.fixture
def signup(pg: Any) -> Callable[[], list[str]]:
    # The duplicate is caught only by COMMIT: the INSERT itself succeeds.
    pg.execute("DROP TABLE IF EXISTS signup")
    pg.execute("CREATE TABLE signup (name text, CONSTRAINT signup_once UNIQUE (name) DEFERRABLE INITIALLY DEFERRED)")
    return lambda: sorted(r[0] for r in pg.execute("SELECT name FROM signup"))


def insert(conn: Any, table: str, value: str) -> None:
    with conn.cursor() as cur:
        cur.execute(f"INSERT INTO {table} VALUES (%s)", (value,))


# -- 11.1: the mode decides the request's autocommit, whatever the pool's resting state ---------


def _pool_from(origin: str, dsn: str, make_middleware: Callable[..., PgPoolMiddleware],
               make_pool: Callable[..., ConnectionPool]) -> ConnectionPool:
    if origin == "standalone":
        return make_pool(max_size=1)
    mode = origin.split("-")[0]
    if origin.endswith("-named"):
        return make_middleware(lambda e, s: [], dsn=dsn, transaction=mode,
                               pools={"shared": {"dsn": dsn, "max_size": 1}}).pools["shared"]
    return make_middleware(lambda e, s: [], dsn=dsn, transaction=mode, max_size=1).pool


@pytest.mark.parametrize("origin", ["manual-built", "commit-built", "autocommit-built", "standalone",
                                    "manual-named", "autocommit-named"])
@pytest.mark.parametrize("mode", MODES)
def test_the_mode_decides_autocommit_whatever_the_pool(dsn, make_middleware, make_pool, rows, origin, mode):
    pool = _pool_from(origin, dsn, make_middleware, make_pool)
    conn = pool.getconn()
    resting = conn.autocommit  # the pool's own state, before any request
    pool.putconn(conn)
    named = origin.endswith("-named")
    seen: list[bool] = []

    def app(environ, start_response):
        conn = environ["pgpool.shared"].conn if named else environ["pgpool.conn"]
        seen.append(conn.autocommit)
        insert(conn, "req_rows", mode)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    if named:
        middleware = make_middleware(app, dsn=dsn, transaction=mode, pools={"shared": pool})
    else:
        middleware = make_middleware(app, pool=pool, transaction=mode)
    serve(validator(middleware))
    assert seen == [mode == "autocommit"]
    # manual rolls back what the app left; commit and autocommit keep it.
    assert rows() == ([] if mode == "manual" else [mode])
    conn = pool.getconn()
    assert conn.autocommit is resting, "the connection goes back to its pool's resting state"
    pool.putconn(conn)
    assert pool.stats()["discarded"] == 0 and pool.stats()["in_use"] == 0


# -- 11.3: environ["pgpool.conn"] goes when the connection goes ---------------------------------


def _outer(inner: Any, seen: list[Any]) -> Any:
    # An outer middleware / error handler that looks at the environ after the inner one returns.
    def outer(environ, start_response):
        try:
            result = inner(environ, start_response)
        except Exception:
            seen.append(environ.get("pgpool.conn"))
            raise
        seen.append(environ.get("pgpool.conn"))
        return result
    return outer


@pytest.mark.parametrize("mode", MODES)
def test_conn_key_is_removed_when_the_connection_goes_back(mw, mode):
    seen: list[Any] = []
    handles: list[Any] = []

    def app(environ, start_response):
        handles.append(environ["pgpool.handle"])
        query(environ["pgpool.conn"], "SELECT 1")
        path = environ["PATH_INFO"]
        if path == "/raise":
            raise RuntimeError("boom")
        if path == "/release":
            environ["pgpool.handle"].release()
            seen.append(("after release", environ.get("pgpool.conn")))
        start_response("200 OK", [("Content-Type", "text/plain")])
        if path == "/stream":
            return iter([b"a", b"b"])
        return [b"list"]

    middleware = mw(app, transaction=mode)
    outer = _outer(middleware, seen)
    serve(outer, make_environ("/list"))
    assert seen.pop() is None, "list body: the connection is back before the middleware returns"
    serve(outer, make_environ("/release"))
    assert seen == [("after release", None), None]
    seen.clear()
    environ = make_environ("/stream")
    serve(outer, environ)
    assert "pgpool.conn" not in environ
    with pytest.raises(RuntimeError):
        serve(outer, make_environ("/raise"))
    assert seen[-1] is None
    for handle in handles:  # never the old connection again
        with pytest.raises(PoolError, match="request finished"):
            _ = handle.conn
    assert middleware.pool.stats()["in_use"] == 0


# -- 11.4: a PoolError from a named pool leaves the main connection alone ------------------------


def test_exhausted_named_pool_gives_503s_and_keeps_the_main_connection(mw, make_pool, dsn):
    replica = make_pool(max_size=1, timeout=0.05, name="replica")
    holder = replica.getconn()

    def app(environ, start_response):
        query(environ["pgpool.conn"], "SELECT 1")
        if environ["PATH_INFO"] == "/adapt":
            query(environ["pgpool.conn"], "SELECT %s", (object(),))  # client side: "can't adapt type"
        query(environ["pgpool.replica"].conn, "SELECT 1")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    middleware = mw(app, max_size=2, pools={"replica": replica})
    client = webtest.TestApp(middleware)
    for _ in range(3):
        res = client.get("/", status=503)
        assert res.headers["Retry-After"] == "1"
    with pytest.raises(psycopg2.ProgrammingError):
        client.get("/adapt")
    stats = middleware.pool.stats()
    assert (stats["connects"], stats["discarded"], stats["in_use"]) == (1, 0, 0)
    assert middleware.refused() == 3
    replica.putconn(holder)


# -- 16.1: one checkout however many threads ask --------------------------------------------------


@pytest.mark.parametrize("which", ["replica", "lazy-main"])
def test_threads_asking_a_lazy_handle_share_one_checkout(mw, make_pool, which):
    replica = make_pool(max_size=4, name="replica")
    key = "pgpool.replica" if which == "replica" else "pgpool.handle"

    def app(environ, start_response):
        handle = environ[key]
        barrier = threading.Barrier(4, timeout=10)

        def read(i: int) -> int:
            barrier.wait()
            with handle.conn.cursor() as cur:  # one connection: psycopg2 serialises the queries
                cur.execute("SELECT pg_backend_pid()")
                return int(cur.fetchone()[0])

        with concurrent.futures.ThreadPoolExecutor(4) as executor:
            pids = set(executor.map(read, range(4), timeout=30))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(len(pids)).encode()]

    middleware = mw(app, checkout="lazy", max_size=4, pools={"replica": replica})
    pool = replica if which == "replica" else middleware.pool
    for _ in range(3):
        assert webtest.TestApp(middleware).get("/").text == "1"
    stats = pool.stats()
    assert stats["in_use"] == 0 and stats["checkouts"] == 3


# -- 16.2: a handle after release() and after the request ------------------------------------------


def test_handle_after_release_and_after_the_request(mw):
    kept: list[Any] = []

    def app(environ, start_response):
        handle = environ["pgpool.handle"]
        kept.append(handle)
        first = query(handle.conn, "SELECT pg_backend_pid()")
        handle.release()
        # After release(): .conn checks out again; that one goes back with the request.
        second = handle.conn
        kept.append(query(second, "SELECT 1") == 1 and first > 0)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return iter([b"x"])

    middleware = mw(app, max_size=1, timeout=0.5)
    webtest.TestApp(middleware).get("/")
    assert kept[1] is True
    stats = middleware.pool.stats()
    assert stats["checkouts"] == 2 and stats["in_use"] == 0
    result: list[BaseException] = []
    thread = threading.Thread(target=lambda: result.append(_raises(lambda: kept[0].conn)))
    thread.start()
    thread.join(10)
    assert isinstance(result[0], PoolError) and "request finished" in str(result[0])
    assert middleware.pool.stats()["in_use"] == 0
    webtest.TestApp(middleware).get("/")  # max_size=1: nothing was left checked out


def _raises(call: Callable[[], Any]) -> BaseException | None:
    try:
        call()
    except BaseException as exc:  # noqa: BLE001 - handed to the test
        return exc
    return None


# -- 16.5: a framework's 500 for our PoolError becomes the 503 ------------------------------------


def _flask_app() -> flask.Flask:
    app = flask.Flask("pgpool_test")

    @app.route("/replica")
    def replica() -> str:
        return str(query(flask.request.environ["pgpool.replica"].conn, "SELECT 1"))

    @app.route("/lazy")
    def lazy() -> str:
        return str(query(flask.request.environ["pgpool.handle"].conn, "SELECT 1"))

    @app.route("/fallback")
    def fallback() -> str:
        try:
            _ = flask.request.environ["pgpool.replica"].conn
        except PoolError:
            return "served without the replica"
        return "replica"

    return app


def _pyramid_app() -> Any:
    def replica_view(request: Any) -> Any:
        return PyramidResponse(str(query(request.environ["pgpool.replica"].conn, "SELECT 1")))

    def lazy_view(request: Any) -> Any:
        return PyramidResponse(str(query(request.environ["pgpool.handle"].conn, "SELECT 1")))

    def error_view(exc: Exception, request: Any) -> Any:
        return PyramidResponse("something went wrong", status=500)

    with Configurator() as config:
        config.add_route("replica", "/replica")
        config.add_route("lazy", "/lazy")
        config.add_view(replica_view, route_name="replica")
        config.add_view(lazy_view, route_name="lazy")
        config.add_view(error_view, context=Exception)
        return config.make_wsgi_app()


@pytest.mark.parametrize("framework", ["flask", "pyramid"])
def test_framework_500_after_a_pool_error_is_our_503(mw, make_pool, framework, pool_log):
    replica = make_pool(max_size=1, timeout=0.05, name="replica")
    app = _flask_app() if framework == "flask" else _pyramid_app()
    middleware = mw(app, checkout="lazy", max_size=1, timeout=0.05, pools={"replica": replica})
    client = webtest.TestApp(validator(middleware))
    holders = [replica.getconn(), middleware.pool.getconn()]
    for path in ("/replica", "/lazy"):
        res = client.get(path, status=503)
        assert res.headers["Retry-After"] == "1" and b"503" in res.body
    assert middleware.refused() == 2
    assert sum("503" in r.getMessage() for r in pool_log.records if r.levelno == logging.WARNING) == 2
    if framework == "flask":  # an app that copes with the error keeps its answer
        assert client.get("/fallback").text == "served without the replica"
    for pool, conn in zip((replica, middleware.pool), holders):
        pool.putconn(conn)
    assert client.get("/replica").text == "1"
    assert replica.stats()["in_use"] == 0 and middleware.pool.stats()["in_use"] == 0


# -- 13.10 / 16.6: nested middleware and sub-requests reuse the request's connection --------------


def test_sub_request_reuses_the_requests_connection(mw):
    def app(environ, start_response):
        pid = query(environ["pgpool.conn"], "SELECT pg_backend_pid()")
        if environ["PATH_INFO"] == "/outer":
            inner = webob.Request.blank("/inner").get_response(middleware)
            body = f"{pid} {inner.status_int} {inner.text}".encode()
        else:
            body = str(pid).encode()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [body]

    middleware = mw(app, max_size=1, timeout=2)
    outer_pid, inner_status, inner_pid = webtest.TestApp(middleware).get("/outer").text.split()
    assert inner_status == "200" and inner_pid == outer_pid
    assert middleware.pool.stats()["checkouts"] == 1 and middleware.pool.stats()["in_use"] == 0
    assert middleware.refused() == 0


@pytest.mark.parametrize("mode", MODES)
def test_nested_middleware_for_the_same_pool_passes_through(mw, make_pool, mode):
    pool = make_pool(max_size=1, timeout=2)

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(query(environ["pgpool.conn"], "SELECT 1")).encode()]

    inner = mw(app, pool=pool, transaction=mode)
    outer = mw(inner, pool=pool, transaction=mode)
    response, body = serve(validator(outer))
    assert response.status == "200 OK" and body == b"1"
    assert pool.stats()["checkouts"] == 1 and pool.stats()["in_use"] == 0


# -- 13.4: commit mode never answers a false 200 -------------------------------------------------


def test_commit_failure_with_a_streamed_body_is_a_500(mw, signup):
    def app(environ, start_response):
        insert(environ["pgpool.conn"], "signup", "alice")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return (chunk for chunk in [b"", b"account ", b"created"])

    middleware = mw(validator(app), transaction="commit")
    response, body = serve(validator(middleware))
    assert (response.status, body) == ("200 OK", b"account created")
    response, body = serve(validator(middleware))
    assert response.status.startswith("500") and b"could not be committed" in body
    assert signup() == ["alice"] and middleware.pool.stats()["in_use"] == 0


def test_commit_failure_with_write_is_a_500(mw, signup):
    def app(environ, start_response):
        insert(environ["pgpool.conn"], "signup", "bob")
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"account ")
        write(b"created")
        return []

    middleware = mw(validator(app), transaction="commit")
    written: list[bytes] = []

    def call() -> tuple[Response, bytes]:
        written.clear()
        response = Response()
        real = response.start_response
        response.start_response = lambda *a: (real(*a), written.append)[1]  # type: ignore[method-assign]
        result = validator(middleware)(make_environ(), response.start_response)
        body = b"".join(result)
        result.close()
        return response, b"".join(written) + body

    assert [call()[0].status, call()[0].status[:3]] == ["200 OK", "500"]
    response, body = call()
    assert response.calls == 1 and b"could not be committed" in body and b"created" not in body
    assert signup() == ["bob"]


# -- 13.6: a lazy checkout failing inside a streaming body -----------------------------------------


def test_pool_error_in_a_streaming_body(mw, pool_log):
    def app(environ, start_response):
        handle = environ["pgpool.handle"]
        start_response("200 OK", [("Content-Type", "text/plain")])

        def body():
            if environ["PATH_INFO"] == "/late":
                yield b"first chunk\n"
            yield str(query(handle.conn, "SELECT 1")).encode()

        return body()

    middleware = mw(validator(app), checkout="lazy", max_size=1, timeout=0.05)
    holder = middleware.pool.getconn()
    response, body = serve(validator(middleware), make_environ("/early"))
    assert response.status.startswith("503") and response.header("Retry-After") == "1"
    pool_log.clear()
    response, body = serve(validator(middleware), make_environ("/late"))
    assert response.status == "200 OK" and body == b"first chunk\n"
    lines = [r.getMessage() for r in pool_log.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "cut short" in lines[0]
    middleware.pool.putconn(holder)
    assert middleware.refused() == 1 and middleware.pool.stats()["in_use"] == 0


# -- 13.8: the body keeps the inner body's length ---------------------------------------------------


class Sized:
    def __init__(self, *chunks: bytes) -> None:
        self.chunks = chunks

    def __iter__(self) -> Any:
        return iter(self.chunks)

    def __len__(self) -> int:
        return len(self.chunks)


def test_body_keeps_len_and_generators_do_not_get_one(mw):
    def app(environ, start_response):
        query(environ["pgpool.conn"], "SELECT 1")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Sized(b"hello") if environ["PATH_INFO"] == "/sized" else (b for b in [b"x"])

    middleware = mw(app)
    result = middleware(make_environ("/sized"), Response().start_response)
    assert len(result) == 1  # type: ignore[arg-type]
    result.close()  # type: ignore[attr-defined]
    result = middleware(make_environ("/gen"), Response().start_response)
    assert not hasattr(result, "__len__")
    result.close()  # type: ignore[attr-defined]


# -- 14.8: the 503s are counted per process ----------------------------------------------------------


def test_refused_counts_per_process(mw):
    middleware = mw(lambda e, s: [], max_size=1, timeout=0.05)
    holder = middleware.pool.getconn()
    serve(middleware)
    serve(middleware)
    assert middleware.refused() == 2
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pool I/O, only the counter
        try:
            os.write(write, str(middleware.refused()).encode())
        finally:
            os._exit(0)
    os.close(write)
    with open(read, "rb") as pipe:
        child_count = pipe.read()
    os.waitpid(pid, 0)
    assert child_count == b"0" and middleware.refused() == 2
    middleware.pool.putconn(holder)


def test_app_that_changes_its_status_to_500_after_a_pool_error_gets_the_503(mw, make_pool):
    replica = make_pool(max_size=1, timeout=0.05, name="replica")

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            _ = environ["pgpool.replica"].conn
        except PoolError:
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")], sys.exc_info())
            return [b"error page"]
        return [b"ok"]

    middleware = mw(validator(app), pools={"replica": replica})
    holder = replica.getconn()
    response, body = serve(validator(middleware))
    assert response.status.startswith("503") and response.header("Retry-After") == "1" and b"503" in body
    replica.putconn(holder)
    assert serve(validator(middleware))[1] == b"ok" and middleware.refused() == 1


@pytest.mark.parametrize(("read", "expect"), [(None, ["after", "before"]), (1, ["before"])])
def test_commit_mode_commits_at_the_first_chunk_and_again_at_a_complete_end(mw, rows, read, expect):
    seen: list[list[str]] = []

    def app(environ, start_response):
        conn = environ["pgpool.conn"]
        start_response("200 OK", [("Content-Type", "text/plain")])

        def body():
            insert(conn, "req_rows", "before")
            yield b"a"
            seen.append(rows())  # another session already sees the first part: committed with the first chunk
            insert(conn, "req_rows", "after")
            yield b"b"

        return body()

    middleware = mw(validator(app), transaction="commit")
    serve(validator(middleware), read=read)
    assert seen == [["before"]] and rows() == expect  # work after the first chunk: committed only if the body completed
    assert middleware.pool.stats()["in_use"] == 0
