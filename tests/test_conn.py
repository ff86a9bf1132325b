"""One connection at a time: examine, ping, reset, is_broken_error, check_capacity (real server).

These drive pgpool_wsgi._conn and _upkeep.check_capacity directly with
connections from psycopg2.connect(), so they do not depend on when the pool
chooses to call them; tests/test_session.py goes through the middleware.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import psycopg2.extensions as ext
import psycopg2.extras
import pytest

from pgpool_wsgi import ConnectionPool, PoolError, PoolTimeout, _conn, _upkeep
from tests.pgserver import PgServer
from tests.tcpproxy import TcpProxy, _Link


@pytest.fixture
def connect(dsn: str) -> Iterator[Callable[..., Any]]:
    """psycopg2.connect against the session server; every connection is closed after the test."""
    made: list[Any] = []

    def make(target: str | None = None, **kwargs: Any) -> Any:
        conn = psycopg2.connect(target or dsn, **kwargs)
        made.append(conn)
        return conn

    yield make
    for conn in made:
        conn.close()


def scalar(conn: Any, sql: str, params: tuple[Any, ...] | None = None) -> Any:
    with conn.cursor(cursor_factory=ext.cursor) as cur:
        cur.execute(sql, params)
        return cur.fetchone()[0]


def raise_notices(conn: Any, count: int) -> None:
    with conn.cursor() as cur:
        cur.execute(f"DO $$BEGIN FOR i IN 1..{count} LOOP RAISE NOTICE 'n%', i; END LOOP; END$$")


def terminate(pg: PgServer, conn: Any) -> None:
    pid = conn.info.backend_pid
    pg.execute("SELECT pg_terminate_backend(%s)", (pid,))
    deadline = time.monotonic() + 10
    while pg.backend_alive(pid):
        assert time.monotonic() < deadline, "backend did not go away"
        time.sleep(0.02)


def wait_readable(conn: Any) -> None:
    deadline = time.monotonic() + 10
    while not _conn._readable(conn.fileno()):
        assert time.monotonic() < deadline, "nothing arrived on the socket"
        time.sleep(0.01)


class HoldingProxy(TcpProxy):
    """Forwards both ways but never passes the server's end of stream on.

    The client then gets the server's FATAL message while its socket stays
    open: only the FATAL notice tells examine() that the session is gone (a
    load balancer that keeps client connections behaves like this).
    """

    @staticmethod
    def _server_to_client(link: _Link) -> None:
        assert link.upstream is not None
        with contextlib.suppress(OSError):
            while data := link.upstream.recv(65536):
                link.client.sendall(data)


# -- examine: the FATAL notice after psycopg2's 50-notice cap (#10 item 7, #16 item 4) --


@pytest.mark.parametrize("earlier", [0, 49, 50, 120])
def test_examine_sees_a_fatal_notice_after_the_notice_cap(pg, connect, earlier):
    with HoldingProxy(pg.port) as proxy:
        conn = connect(pg.dsn(port=proxy.port))
        conn.autocommit = True
        raise_notices(conn, earlier)
        assert len(conn.notices) == min(earlier, 50)  # psycopg2 keeps the last 50
        terminate(pg, conn)
        wait_readable(conn)
        assert _conn.examine(conn) is False
        # The socket is still open: only the FATAL notice said "dead".
        assert not conn.closed and not _conn._readable(conn.fileno())


def test_examine_keeps_a_notified_connection_after_the_cap(pg, connect):
    conn = connect()
    conn.autocommit = True
    raise_notices(conn, 60)
    with conn.cursor() as cur:
        cur.execute("LISTEN conn_test")
    pg.execute("NOTIFY conn_test, 'hello'")
    wait_readable(conn)
    assert _conn.examine(conn) is True
    assert [n.payload for n in conn.notifies] == ["hello"]
    assert scalar(conn, "SELECT 1") == 1


def test_examine_works_with_a_user_notices_deque(pg, connect):
    import collections

    conn = connect()
    conn.autocommit = True
    conn.notices = collections.deque(maxlen=3)
    raise_notices(conn, 5)
    terminate(pg, conn)
    wait_readable(conn)
    assert _conn.examine(conn) is False


# -- is_broken_error: interrupts only; the connection's state is judged by reset (#11 item 4) --


def test_a_failed_statement_does_not_break_the_connection(connect):
    conn = connect()
    with pytest.raises(psycopg2.Error) as info, conn.cursor() as cur:
        cur.execute("SELECT 1/0")
    assert info.value.pgcode == "22012"
    assert _conn.is_broken_error(info.value) is False
    assert _conn.reset(conn, _conn.Session(conn), None) is None
    assert scalar(conn, "SELECT 2") == 2


@pytest.mark.parametrize("make_error", [
    pytest.param(lambda cur: cur.execute("SELECT %s", (object(),)), id="cant-adapt"),
    pytest.param(lambda cur: cur.execute("SELECT %s, %s", (1,)), id="too-few-params"),
    pytest.param(lambda cur: cur.execute("SELECT %(a)s", {"b": 1}), id="missing-key"),
    pytest.param(lambda cur: cur.fetchone(), id="no-results"),
])
def test_client_side_errors_do_not_break_the_connection(connect, make_error):
    conn = connect()
    session = _conn.Session(conn)
    scalar(conn, "SELECT 1")  # a transaction is open, as in a request
    with pytest.raises(Exception) as info, conn.cursor() as cur:
        make_error(cur)
    assert _conn.is_broken_error(info.value) is False
    assert _conn.reset(conn, session, None) is None
    assert scalar(conn, "SELECT 3") == 3


@pytest.mark.parametrize("error", [PoolError("replica: cannot connect"), PoolTimeout("x"),
                                   psycopg2.InterfaceError("cursor already closed")])
def test_our_pool_errors_and_classless_driver_errors_do_not_break(error):
    assert error.pgcode is None  # the old rule called these broken from the class alone
    assert _conn.is_broken_error(error) is False


def test_a_pool_error_from_another_pool_keeps_the_connection(make_pool):
    main = make_pool(max_size=1)
    other = make_pool(dsn="host=127.0.0.1 port=1 dbname=x user=x", max_size=1, name="other")
    with pytest.raises(PoolError) as info, main.connection() as conn:
        backend = conn.info.backend_pid
        other.getconn()  # refused: PoolError
    assert _conn.is_broken_error(info.value) is False
    assert main.stats()["discarded"] == 0
    with main.connection() as conn:
        assert conn.info.backend_pid == backend


def test_an_interrupt_discards_the_connection(make_pool):
    pool = make_pool(max_size=1)
    with pytest.raises(KeyboardInterrupt), pool.connection() as conn:
        backend = conn.info.backend_pid
        raise KeyboardInterrupt
    assert pool.stats()["discarded"] == 1
    with pool.connection() as conn:
        assert conn.info.backend_pid != backend


@pytest.mark.parametrize("error", [KeyboardInterrupt(), SystemExit(1), GeneratorExit()])
def test_interrupting_exceptions_break_the_connection(error):
    assert _conn.is_broken_error(error) is True


def test_a_terminated_backend_is_discarded_by_reset(pg, connect):
    conn = connect()
    session = _conn.Session(conn)
    scalar(conn, "SELECT 1")
    terminate(pg, conn)
    with pytest.raises(psycopg2.OperationalError) as info:
        scalar(conn, "SELECT 1")
    assert _conn.is_broken_error(info.value) is False  # not from the class: from the state
    assert _conn.reset(conn, session, None) is not None


def test_a_failed_rollback_is_discarded_by_reset(pg):
    with TcpProxy(pg.port) as proxy:
        conn = psycopg2.connect(pg.dsn(port=proxy.port))
        try:
            session = _conn.Session(conn)
            scalar(conn, "SELECT 1")
            proxy.sever()  # the rollback finds the link cut
            assert _conn.reset(conn, session, None) is not None
        finally:
            conn.close()


# -- ping: a plain cursor, never a change to the connection (#14 item 3) --


def test_ping_uses_a_plain_cursor_and_logs_nothing(connect):
    out = io.StringIO()
    conn = connect(connection_factory=psycopg2.extras.LoggingConnection)
    conn.initialize(out)
    assert _conn.ping(conn) is True
    assert "SELECT 1" not in out.getvalue()  # the app's own SQL log shows only the app's SQL
    assert conn.autocommit is False and conn.info.transaction_status == ext.TRANSACTION_STATUS_IDLE


def test_ping_works_on_an_uninitialised_logging_connection(connect):
    conn = connect(connection_factory=psycopg2.extras.LoggingConnection)
    assert _conn.ping(conn) is True


@pytest.mark.parametrize("autocommit", [False, True])
def test_a_failed_internal_query_leaves_autocommit_alone(connect, autocommit):
    """What ping, the capacity check and reset_sql share: autocommit restored, no transaction left."""
    conn = connect()
    conn.autocommit = autocommit
    with pytest.raises(psycopg2.Error), _conn.outside_transaction(conn) as cur:
        cur.execute("SELECT no_such_function()")
    assert conn.autocommit is autocommit and not conn.closed
    assert conn.info.transaction_status == ext.TRANSACTION_STATUS_IDLE
    assert scalar(conn, "SELECT 4") == 4


# -- check_capacity: never changes the connection, sees role/database limits (#11 item 2, #14 items 3, 8) --


class FakePool:
    name = "captest"

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size


def capacity_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "this deployment may open" in r.getMessage()]


@pytest.mark.parametrize("autocommit", [False, True])
def test_a_failed_capacity_query_leaves_the_connection_alone(connect, monkeypatch, caplog, autocommit):
    caplog.set_level(logging.DEBUG, logger="pgpool_wsgi")
    monkeypatch.setattr(_upkeep, "_CAPACITY_SQL", "SELECT current_setting('max_connections', true, 1)")
    conn = connect()
    conn.autocommit = autocommit
    _upkeep.check_capacity(FakePool(10_000), conn)  # type: ignore[arg-type]
    assert conn.autocommit is autocommit
    assert conn.info.transaction_status == ext.TRANSACTION_STATUS_IDLE
    assert not capacity_warnings(caplog)
    assert any("could not read" in r.getMessage() for r in caplog.records)


def test_a_failed_capacity_query_leaves_pool_connections_transactional(make_pool, monkeypatch):
    """The pool records the connection's state after the check: it must be the driver's default."""
    monkeypatch.setattr(_upkeep, "_CAPACITY_SQL", "SELECT no_such_function()")
    pool = make_pool(max_size=2)
    conn = pool.getconn()
    try:
        assert conn.autocommit is False
        with conn.cursor() as cur:
            cur.execute("CREATE TEMP TABLE captest_t (x int)")
        conn.rollback()  # a manual-mode request's leftovers are undone, not committed
        assert scalar(conn, "SELECT to_regclass('pg_temp.captest_t') IS NULL") is True
    finally:
        pool.putconn(conn)


@pytest.mark.parametrize("kwargs", [
    pytest.param({"cursor_factory": psycopg2.extras.RealDictCursor}, id="RealDictCursor"),
    pytest.param({"cursor_factory": psycopg2.extras.NamedTupleCursor}, id="NamedTupleCursor"),
    pytest.param({"connection_factory": psycopg2.extras.LoggingConnection}, id="LoggingConnection-uninitialised"),
    pytest.param({"connection_factory": psycopg2.extras.RealDictConnection}, id="RealDictConnection"),
    pytest.param({"connection_factory": psycopg2.extras.DictConnection}, id="DictConnection"),
])
def test_capacity_check_works_with_any_cursor_or_connection_factory(connect, caplog, kwargs):
    caplog.set_level(logging.DEBUG, logger="pgpool_wsgi")
    conn = connect(**kwargs)
    _upkeep.check_capacity(FakePool(10_000), conn)  # type: ignore[arg-type]
    assert len(capacity_warnings(caplog)) == 1
    assert conn.autocommit is False and conn.info.transaction_status == ext.TRANSACTION_STATUS_IDLE


@pytest.fixture
def limited(pg: PgServer) -> Iterator[tuple[str, str]]:
    """A role with CONNECTION LIMIT 3 and a database with CONNECTION LIMIT 4 (dropped after)."""
    pg.execute("DROP ROLE IF EXISTS conn_limited")
    pg.execute("CREATE ROLE conn_limited LOGIN CONNECTION LIMIT 3")
    pg.execute("DROP DATABASE IF EXISTS conn_limited_db")
    pg.execute("CREATE DATABASE conn_limited_db CONNECTION LIMIT 4")
    try:
        yield "conn_limited", "conn_limited_db"
    finally:
        pg.execute("DROP DATABASE IF EXISTS conn_limited_db WITH (FORCE)")
        pg.execute("DROP ROLE IF EXISTS conn_limited")


@pytest.mark.parametrize(("user", "dbname", "max_size", "limit", "who"), [
    ("conn_limited", "postgres", 4, 3, "role conn_limited"),
    ("conn_limited", "postgres", 3, None, None),
    ("app", "conn_limited_db", 5, 4, "database conn_limited_db"),
    ("app", "conn_limited_db", 4, None, None),
    ("conn_limited", "conn_limited_db", 4, 3, "role conn_limited"),
    ("postgres", "conn_limited_db", 100, None, None),  # a superuser is not held to either limit
])
def test_capacity_warning_counts_role_and_database_connection_limits(
        pg, connect, caplog, limited, user, dbname, max_size, limit, who):
    caplog.set_level(logging.WARNING, logger="pgpool_wsgi")
    conn = connect(pg.dsn(user=user, dbname=dbname))
    _upkeep.check_capacity(FakePool(max_size), conn)  # type: ignore[arg-type]
    warnings = capacity_warnings(caplog)
    if limit is None:
        assert warnings == []
    else:
        assert len(warnings) == 1
        assert f"open {max_size} connections" in warnings[0]
        assert f"{who} accepts {limit}" in warnings[0] and "CONNECTION LIMIT" in warnings[0]


def test_capacity_warning_counts_a_role_limit_through_the_pool(pg, limited, caplog):
    caplog.set_level(logging.WARNING, logger="pgpool_wsgi")
    pool = ConnectionPool(pg.dsn(user="conn_limited"), max_size=5)
    try:
        with pool.connection() as conn:
            assert scalar(conn, "SELECT current_user") == "conn_limited"
    finally:
        pool.close()
    assert len(capacity_warnings(caplog)) == 1
