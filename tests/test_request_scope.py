"""How far a request reaches: its body, its sub-requests, copied contexts, late 5xx answers (issue 16)."""

from __future__ import annotations

import contextvars
import io
import logging
import sys
import threading
from collections.abc import Callable
from typing import Any
from wsgiref.handlers import SimpleHandler
from wsgiref.validate import validator

import flask
import pytest
import webob

from pgpool_wsgi import ConnectionPool, PgPoolMiddleware, PoolError
from tests.test_middleware import make_environ, query, serve

pytestmark = pytest.mark.filterwarnings("error::wsgiref.validate.WSGIWarning")


@pytest.fixture
def mw(dsn: str, make_middleware: Callable[..., PgPoolMiddleware]) -> Callable[..., PgPoolMiddleware]:
    return lambda app, **options: make_middleware(app, **({"dsn": dsn} if "pool" not in options else {}), **options)


@pytest.fixture
def rows(pg: Any) -> Callable[[], list[str]]:
    pg.execute("CREATE TABLE IF NOT EXISTS scope_rows (v text)")
    pg.execute("TRUNCATE scope_rows")
    return lambda: sorted(r[0] for r in pg.execute("SELECT v FROM scope_rows"))


@pytest.fixture
def down(make_pool: Callable[..., ConnectionPool]) -> Any:
    """A named pool that cannot give a connection: its only one is held."""
    replica = make_pool(max_size=1, timeout=0.05, name="replica")
    holder = replica.getconn()
    yield replica
    replica.putconn(holder)


def _pid(environ: dict[str, Any]) -> int:
    return int(query(environ["pgpool.conn"], "SELECT pg_backend_pid()"))


# -- a sub-request from inside the streaming body (or its close) reuses the request's connection --


def test_sub_request_from_a_streaming_body_and_its_close_reuses_the_connection(mw, make_pool):
    pool = make_pool(max_size=1, timeout=2)
    seen: list[Any] = []

    def inner(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(_pid(environ)).encode()]

    inner_mw = mw(inner, pool=pool)

    class Streamed:
        def __init__(self, environ: dict[str, Any]) -> None:
            self.pid = _pid(environ)

        def __iter__(self) -> Any:
            sub = webob.Request.blank("/sub").get_response(inner_mw)  # while the server iterates
            seen.append((sub.status_int, sub.text == str(self.pid)))
            yield b"streamed"

        def close(self) -> None:
            sub = webob.Request.blank("/sub").get_response(inner_mw)  # while the server closes
            seen.append((sub.status_int, sub.text == str(self.pid)))

    def outer(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Streamed(environ)

    response, body = serve(validator(mw(outer, pool=pool)))
    assert response.status == "200 OK" and body == b"streamed"
    assert seen == [(200, True), (200, True)]
    assert pool.stats()["checkouts"] == 1 and pool.stats()["in_use"] == 0


def test_sub_request_from_a_flask_stream_with_context_reuses_the_connection(mw, make_pool):
    pool = make_pool(max_size=1, timeout=2)
    inner_mw = mw(lambda e, s: (s("200 OK", [("Content-Type", "text/plain")]), [str(_pid(e)).encode()])[1],
                  pool=pool)
    app = flask.Flask("pgpool_scope")

    @app.route("/")
    def streamed() -> flask.Response:
        pid = str(_pid(flask.request.environ))

        @flask.stream_with_context
        def chunks() -> Any:
            yield pid.encode() + b" "
            yield webob.Request.blank("/sub").get_response(inner_mw).body  # the same connection: its pid

        return flask.Response(chunks(), mimetype="text/plain")

    response, body = serve(validator(mw(app, pool=pool)))
    first, second = body.split()
    assert response.status == "200 OK" and first == second
    assert pool.stats()["checkouts"] == 1 and pool.stats()["in_use"] == 0


# -- a context copied during the request: after it, a sub-request checks out its own connection ---


def test_a_context_copied_during_the_request_does_not_refuse_later_requests(mw, make_pool):
    pool = make_pool(max_size=2, timeout=2)
    inner_mw = mw(lambda e, s: (s("200 OK", [("Content-Type", "text/plain")]), [str(_pid(e)).encode()])[1],
                  pool=pool)
    copied: list[contextvars.Context] = []

    def outer(environ, start_response):
        copied.append(contextvars.copy_context())  # e.g. an executor that propagates the context
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"queued"]

    assert serve(mw(outer, pool=pool))[1] == b"queued"
    got: list[Any] = []
    job = threading.Thread(target=copied[0].run,
                           args=(lambda: got.append(webob.Request.blank("/job").get_response(inner_mw).status),))
    job.start()
    job.join(30)
    assert got == ["200 OK"]
    assert pool.stats()["in_use"] == 0


# -- start_response(5xx) from inside the body after a pool error: the 503, never a commit ---------


@pytest.mark.parametrize("mode", ["manual", "commit"])
@pytest.mark.parametrize("chunk", [b"replica down", None])
def test_5xx_started_inside_the_body_after_a_pool_error_is_the_503_and_commits_nothing(
        mw, rows, down, mode, chunk):
    def app(environ, start_response):
        def body():
            with environ["pgpool.conn"].cursor() as cur:
                cur.execute("INSERT INTO scope_rows VALUES ('written')")
            try:
                _ = environ["pgpool.replica"].conn
            except PoolError:
                start_response("500 Internal Server Error", [("Content-Type", "text/plain")], sys.exc_info())
                if chunk is not None:
                    yield chunk
                return
            start_response("200 OK", [("Content-Type", "text/plain")])
            yield b"ok"
        return body()

    middleware = mw(app, transaction=mode, pools={"replica": down})
    # No validator: it rejects a start_response in the first iteration, which PEP 3333 allows.
    response, body = serve(middleware)
    assert response.status is not None and response.status.startswith("503"), response.status
    assert response.header("Retry-After") == "1" and b"503" in body
    assert rows() == []
    assert middleware.refused() == 1 and middleware.pool.stats()["in_use"] == 0


# -- the remembered pool error: which 5xx become the 503 -------------------------------------------


def test_an_app_5xx_is_the_503_only_after_an_unrecovered_pool_error(mw, make_pool):
    replica = make_pool(max_size=1, timeout=0.05, name="replica")
    holder: list[Any] = [replica.getconn()]

    def app(environ, start_response):
        path = environ["PATH_INFO"]
        try:
            _ = environ["pgpool.replica"].conn
        except PoolError:
            if path == "/recover":  # the same handle gets a connection after all
                replica.putconn(holder.pop())
                _ = environ["pgpool.replica"].conn
        try:
            raise ZeroDivisionError("a bug unrelated to the database")
        except ZeroDivisionError:
            # With exc_info the cause is known: not the pool's.
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")],
                           sys.exc_info() if path == "/exc_info" else None)
        return [b"bug"]

    middleware = mw(validator(app), pools={"replica": replica})
    assert serve(validator(middleware), make_environ("/exc_info"))[0].status == "500 Internal Server Error"
    # Without exc_info the app's 5xx after an unrecovered pool error is the 503 (the documented rule).
    assert serve(validator(middleware), make_environ("/plain"))[0].status == "503 Service Unavailable"
    assert serve(validator(middleware), make_environ("/recover"))[0].status == "500 Internal Server Error"
    assert middleware.refused() == 1
    assert replica.stats()["in_use"] == 0


# -- a sub-request's environ loses pgpool.conn when the connection goes back ---------------------


def test_sub_request_environ_loses_the_connection_when_it_goes_back(mw, make_pool):
    pool = make_pool(max_size=1, timeout=2)
    kept: list[dict[str, Any]] = []

    def inner(environ, start_response):
        kept.append(environ)  # e.g. a deferred job built from the sub-request
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    inner_mw = mw(inner, pool=pool)

    def outer(environ, start_response):
        sub = webob.Request.blank("/sub").get_response(inner_mw)
        assert kept[-1]["pgpool.conn"] is environ["pgpool.conn"]  # during the request it is there
        start_response("200 OK", [("Content-Type", "text/plain")])
        return iter([sub.body])

    assert serve(mw(outer, pool=pool))[1] == b"ok"
    assert "pgpool.conn" not in kept[0]
    assert pool.stats()["in_use"] == 0


# -- a nested middleware on the same pool keeps its own named pools --------------------------------


@pytest.mark.parametrize("body", ["list", "stream"])
def test_nested_middleware_keeps_its_own_named_pools(mw, make_pool, body):
    pool = make_pool(max_size=1, timeout=2)
    replica = make_pool(max_size=1, timeout=2, name="replica")

    def inner_app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        result = [str(query(environ["pgpool.replica"].conn, "SELECT 1")).encode(),
                  str(query(environ["pgpool.conn"], "SELECT 2")).encode()]
        return result if body == "list" else iter(result)

    inner = mw(inner_app, pool=pool, pools={"replica": replica})
    outer = mw(inner, pool=pool)
    for _ in range(2):
        response, got = serve(validator(outer))
        assert response.status == "200 OK" and got == b"12"
        assert replica.stats()["in_use"] == 0 and pool.stats()["in_use"] == 0
    assert pool.stats()["checkouts"] == 2 and replica.stats()["checkouts"] == 2


def test_nested_middleware_with_another_mode_warns_once(mw, make_pool, pool_log):
    pool = make_pool(max_size=1, timeout=2)
    inner = mw(lambda e, s: (s("200 OK", []), [b""])[1], pool=pool, transaction="commit")
    outer = mw(inner, pool=pool, transaction="manual")
    serve(outer)
    serve(outer)
    lines = [r.getMessage() for r in pool_log.records if r.levelno == logging.WARNING]
    assert len(lines) == 1 and "manual" in lines[0] and "commit" in lines[0]


# -- a 503 that cannot be sent any more is neither counted nor logged as a 503 -----------------------


def test_pool_error_after_write_is_cut_short_not_a_503(mw, pool_log):
    def app(environ, start_response):
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"partial answer\n")
        _ = environ["pgpool.handle"].conn  # the lazy checkout fails now
        return [b"rest"]

    middleware = mw(app, checkout="lazy", max_size=1, timeout=0.05)
    holder = middleware.pool.getconn()
    out, err = io.BytesIO(), io.StringIO()
    SimpleHandler(io.BytesIO(), out, err, make_environ("/x"), multithread=False, multiprocess=False).run(middleware)
    middleware.pool.putconn(holder)
    assert out.getvalue().startswith(b"Status: 200") or b" 200 " in out.getvalue().split(b"\r\n")[0]
    assert b"partial answer" in out.getvalue() and b"503" not in out.getvalue()
    assert middleware.refused() == 0
    lines = [r.getMessage() for r in pool_log.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "cut short" in lines[0] and "503" not in lines[0]
