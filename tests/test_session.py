"""No session state crosses requests: what reset() puts back, against the real server.

Unit tests call _conn.reset() directly (so they hold whichever way the pool
decides to call it); the end-to-end tests go through PgPoolMiddleware with
max_size=1, so every request gets the same server session.

Tests marked FAST-PATH below return connections that look clean to a plain
transaction-status test; they pass once pool.putconn's fast path skips
connections for which _conn.untouched() is False.
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

from pgpool_wsgi import ConnectionPool, PgPoolMiddleware, _conn
from tests.pgserver import PgServer

RECIPE = "SELECT pg_advisory_unlock_all(); DEALLOCATE ALL"  # the README's cheap reset


@pytest.fixture
def connect(dsn: str) -> Iterator[Callable[..., Any]]:
    made: list[Any] = []

    def make(target: str | None = None, **kwargs: Any) -> Any:
        conn = psycopg2.connect(target or dsn, **kwargs)
        made.append(conn)
        return conn

    yield make
    for conn in made:
        conn.close()


def run(conn: Any, sql: str, params: Any = None) -> Any:
    with conn.cursor(cursor_factory=ext.cursor) as cur:
        cur.execute(sql, params)
        return cur.fetchone()[0] if cur.description else None


def call(app: Any, path: str = "/") -> tuple[str, bytes]:
    """One request the way a server makes it; an app exception comes out as ("raised", b"")."""
    seen: list[str] = []
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "SERVER_NAME": "t", "SERVER_PORT": "80",
               "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(), "wsgi.errors": io.StringIO()}
    try:
        result = app(environ, lambda status, headers, exc_info=None: seen.append(status))
    except Exception:  # noqa: BLE001 - the server's 500
        return "raised", b""
    try:
        body = b"".join(result)
    finally:
        getattr(result, "close", lambda: None)()
    return seen[-1], body


def view(fn: Callable[[Any], Any]) -> Callable[..., Any]:
    """A WSGI app that runs fn(conn) and answers 200 with repr(result)."""
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        result = fn(environ["pgpool.conn"])
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [repr(result).encode()]
    return app


@pytest.fixture
def mw(dsn: str, make_middleware: Callable[..., PgPoolMiddleware]) -> Callable[..., PgPoolMiddleware]:
    def make(app: Any, **options: Any) -> PgPoolMiddleware:
        return make_middleware(app, **{"dsn": dsn, "max_size": 1, **options})
    return make


class Routes:
    """path -> fn(conn); unknown paths raise (the app's own exception)."""

    def __init__(self, **routes: Callable[[Any], Any]) -> None:
        self.routes = routes

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        fn = self.routes[environ["PATH_INFO"].strip("/")]
        return view(fn)(environ, start_response)


# -- notices and notifies (#16 item 4) ----------------------------------------------------


@pytest.mark.parametrize("reset_sql", [None, "DISCARD ALL"])
def test_reset_clears_notices_and_notifies(connect, pg, reset_sql):
    conn = connect()
    session = _conn.Session(conn)
    run(conn, "DO $$BEGIN RAISE NOTICE 'token for alice: s3cret'; END$$")
    run(conn, "LISTEN reset_test")
    conn.commit()
    pg.execute("NOTIFY reset_test, 'for alice'")
    deadline = time.monotonic() + 10
    while not conn.notifies:
        assert time.monotonic() < deadline
        run(conn, "SELECT 1")
    assert conn.notices and conn.notifies
    assert _conn.reset(conn, session, reset_sql) is None
    assert conn.notices == [] and conn.notifies == []


def test_reset_keeps_a_users_notice_container(connect):
    import collections

    conn = connect()
    session = _conn.Session(conn)
    conn.notices = notices = collections.deque(maxlen=10)
    run(conn, "DO $$BEGIN RAISE NOTICE 'hello'; END$$")
    assert _conn.reset(conn, session, None) is None
    assert conn.notices is notices and len(notices) == 0


@pytest.mark.parametrize(("transaction", "reset_sql"), [
    ("manual", None), ("manual", "DISCARD ALL"),
    ("commit", None), ("autocommit", None),  # FAST-PATH: committed, nothing to roll back
])
def test_a_notice_never_reaches_the_next_request(mw, transaction, reset_sql):
    def first(conn: Any) -> None:
        run(conn, "DO $$BEGIN RAISE NOTICE 'token for alice: s3cret'; END$$")
        assert any("alice" in n for n in conn.notices)

    app = mw(Routes(first=first, second=lambda conn: list(conn.notices)),
             transaction=transaction, reset_sql=reset_sql)
    assert call(app, "/first")[0] == "200 OK"
    assert call(app, "/second") == ("200 OK", b"[]")


@pytest.mark.parametrize("query_first", [
    True,
    False,  # FAST-PATH: no query, nothing to roll back
])
def test_notifies_do_not_grow_across_requests(mw, pg, query_first):
    def listen(conn: Any) -> int:
        run(conn, "LISTEN grow_test")
        conn.commit()
        return int(conn.fileno())

    def receive(conn: Any) -> list[str]:
        if query_first:
            run(conn, "SELECT 1")
        deadline = time.monotonic() + 10
        while not conn.notifies:  # delivery is asynchronous: ask until it is there
            assert time.monotonic() < deadline
            run(conn, "SELECT 1")
        return [n.payload for n in conn.notifies]

    app = mw(Routes(listen=listen, receive=receive))
    status, fd = call(app, "/listen")
    assert status == "200 OK"
    bodies = []
    for i in range(3):
        pg.execute(f"NOTIFY grow_test, '{i}'")
        deadline = time.monotonic() + 10
        while not _conn._readable(int(fd)):  # delivered to the idle connection before its checkout
            assert time.monotonic() < deadline
            time.sleep(0.005)
        bodies.append(call(app, "/receive")[1])
    assert bodies == [b"['0']", b"['1']", b"['2']"]


# -- two-phase transactions left behind (#16 item 3) ---------------------------------------


@pytest.fixture(scope="module")
def tpc_server() -> Iterator[PgServer]:
    """A server that allows PREPARE TRANSACTION (the session server keeps the default 0)."""
    server = PgServer(name="tpc", ssl=False, conf={"max_prepared_transactions": "4"})
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


def prepared_xacts(server: PgServer) -> int:
    return int(str(server.execute("SELECT count(*) FROM pg_prepared_xacts")[0][0]))


def test_reset_rolls_back_a_prepared_two_phase_transaction(tpc_server):
    conn = psycopg2.connect(tpc_server.dsn())
    try:
        session = _conn.Session(conn)
        run(conn, "CREATE TABLE IF NOT EXISTS tpc_t (x int)")
        conn.commit()
        conn.tpc_begin(conn.xid(1, "pgpool-reset", "b"))
        run(conn, "INSERT INTO tpc_t VALUES (1)")
        conn.tpc_prepare()
        assert conn.status == ext.STATUS_PREPARED and prepared_xacts(tpc_server) == 1
        assert _conn.reset(conn, session, None) is None
        assert conn.status == ext.STATUS_READY and prepared_xacts(tpc_server) == 0
        assert run(conn, "SELECT count(*) FROM tpc_t") == 0
        conn.commit()
    finally:
        conn.close()


def failed_prepare(conn: Any) -> None:
    """tpc_prepare() on a server with max_prepared_transactions = 0 (the default)."""
    conn.tpc_begin(conn.xid(1, "pgpool-failed", "b"))
    run(conn, "SELECT 1")
    with pytest.raises(psycopg2.Error):
        conn.tpc_prepare()
    assert conn.status != ext.STATUS_READY


def test_reset_ends_a_failed_prepare(connect):
    conn = connect()
    session = _conn.Session(conn)
    assert run(conn, "SHOW max_prepared_transactions") == "0"
    conn.rollback()
    failed_prepare(conn)
    assert _conn.reset(conn, session, None) is None
    assert conn.status == ext.STATUS_READY and conn.notices == []
    run(conn, "CREATE TEMP TABLE after_tpc (x int)")
    conn.rollback()  # a transaction again, as the next request expects
    assert run(conn, "SELECT to_regclass('pg_temp.after_tpc') IS NULL") is True


@pytest.mark.parametrize("case", ["failed-prepare", "prepared"])
def test_a_two_phase_leftover_does_not_poison_the_next_request(tpc_server, dsn, make_pool,
                                                               make_middleware, case):
    """FAST-PATH: the leftover comes back with transaction status IDLE."""
    server_dsn = tpc_server.dsn() if case == "prepared" else dsn
    pool = make_pool(dsn=server_dsn, max_size=1)
    run_sql = psycopg2.connect(server_dsn)
    run_sql.autocommit = True
    try:
        run(run_sql, "DROP TABLE IF EXISTS tpc_next; CREATE TABLE tpc_next (x int)")

        def leave_it(conn: Any) -> None:
            conn.tpc_begin(conn.xid(1, f"pgpool-{case}", "b"))
            run(conn, "INSERT INTO tpc_next VALUES (1)")
            with contextlib.suppress(psycopg2.Error):  # the app shrugs it off
                conn.tpc_prepare()

        def innocent(conn: Any) -> int:
            run(conn, "INSERT INTO tpc_next VALUES (2)")
            return int(run(conn, "SELECT count(*) FROM tpc_next"))

        manual = make_middleware(view(leave_it), pool=pool, transaction="manual")
        committing = make_middleware(view(innocent), pool=pool, transaction="commit")
        assert call(manual)[0] == "200 OK"
        assert call(committing) == ("200 OK", b"1")
        assert run(run_sql, "SELECT array_agg(x) FROM tpc_next") == [2]
        assert run(run_sql, "SELECT count(*) FROM pg_prepared_xacts") == 0
    finally:
        run_sql.close()


# -- client encoding (#14 item 6) ----------------------------------------------------------


def cafe_round_trip(conn: Any) -> tuple[str, str, int]:
    return run(conn, "SELECT 'caf' || chr(233)"), run(conn, "SELECT %s::text", ("café",)), \
        run(conn, "SELECT length(%s)", ("café",))


@pytest.mark.parametrize("reset_sql", [None, "DISCARD ALL"])  # None: FAST-PATH (autocommit mode)
def test_client_encoding_is_restored_through_the_middleware(mw, reset_sql):
    def latin1(conn: Any) -> Any:
        conn.set_client_encoding("LATIN1")
        return cafe_round_trip(conn)

    app = mw(Routes(latin1=latin1, cafe=lambda conn: (conn.encoding, *cafe_round_trip(conn))),
             reset_sql=reset_sql, transaction="autocommit" if reset_sql is None else "manual")
    assert call(app, "/latin1") == ("200 OK", repr(("café", "café", 4)).encode())
    assert call(app, "/cafe") == ("200 OK", repr(("UTF8", "café", "café", 4)).encode())


@pytest.mark.parametrize("change", ["set_client_encoding", "SET"])
@pytest.mark.parametrize("reset_sql", [None, "DISCARD ALL"])
def test_reset_restores_the_client_encoding(connect, change, reset_sql):
    conn = connect()
    session = _conn.Session(conn)
    if change == "SET":
        run(conn, "SET client_encoding TO 'LATIN1'")  # the server only: psycopg2 still decodes UTF8
    else:
        conn.set_client_encoding("LATIN1")
    assert _conn.reset(conn, session, reset_sql) is None
    assert conn.encoding == "UTF8" and conn.info.parameter_status("client_encoding") == "UTF8"
    assert cafe_round_trip(conn) == ("café", "café", 4)


@pytest.mark.parametrize("transaction", ["autocommit", "commit"])
def test_a_client_encoding_set_in_sql_survives_like_any_set_until_a_reset(mw, transaction):
    """A SET client_encoding run in SQL is a SET like any other (README): psycopg2's codec never
    hears of it, the fast return does not look (it would cost ~300 ns a return), and reset_sql
    undoes it. set_client_encoding(), the driver's own way, is always undone (tests above)."""
    def latin1(conn: Any) -> Any:
        run(conn, "SET client_encoding TO 'LATIN1'")
        return conn.encoding

    routes = Routes(latin1=latin1, enc=lambda conn: conn.get_parameter_status("client_encoding"),
                    cafe=lambda conn: cafe_round_trip(conn))
    plain = mw(routes, transaction=transaction)
    assert call(plain, "/latin1") == ("200 OK", repr("UTF8").encode())
    assert call(plain, "/enc") == ("200 OK", repr("LATIN1").encode())  # documented: it survives
    reset = mw(routes, transaction=transaction, reset_sql="DISCARD ALL")
    assert call(reset, "/latin1") == ("200 OK", repr("UTF8").encode())
    assert call(reset, "/cafe") == ("200 OK", repr(("café", "café", 4)).encode())


def test_reset_undoes_a_client_encoding_set_in_sql(connect):
    conn = connect()
    conn.autocommit = True
    session = _conn.Session(conn)
    run(conn, "SET client_encoding TO 'LATIN1'")
    assert conn.encoding == "UTF8"
    assert _conn.reset(conn, session, None) is None
    assert conn.get_parameter_status("client_encoding") == "UTF8" and cafe_round_trip(conn) == ("café", "café", 4)


def test_untouched_sees_psycopg2s_own_encoding_even_when_the_server_was_set_back(connect):
    """set_client_encoding('LATIN1') then SET back to UTF8 in SQL: the codec still differs."""
    conn = connect()
    conn.autocommit = True
    session = _conn.Session(conn)
    assert _conn.untouched(conn, session)
    conn.set_client_encoding("LATIN1")
    run(conn, "SET client_encoding TO 'UTF8'")
    assert conn.encoding == "LATIN1" and not _conn.untouched(conn, session)
    assert _conn.reset(conn, session, None) is None
    assert _conn.untouched(conn, session) and cafe_round_trip(conn) == ("café", "café", 4)


def test_reset_restores_an_encoding_chosen_by_configure(connect):
    """configure chose LATIN1; DISCARD ALL puts the server back to UTF8 while psycopg2 stays LATIN1."""
    conn = connect()
    conn.set_client_encoding("LATIN1")
    session = _conn.Session(conn)
    assert _conn.reset(conn, session, "DISCARD ALL") is None
    assert conn.encoding == "LATIN1" and conn.info.parameter_status("client_encoding") == "LATIN1"
    assert cafe_round_trip(conn) == ("café", "café", 4)


# -- session advisory locks and prepared statements (#14 item 7) ---------------------------


@pytest.mark.parametrize(("reset_sql", "survives"), [(None, True), (RECIPE, False), ("DISCARD ALL", False)])
def test_advisory_locks_and_prepared_statements_after_a_failed_request(mw, pg, reset_sql, survives):
    def fail(conn: Any) -> None:
        run(conn, "SELECT pg_advisory_lock(7)")
        run(conn, "PREPARE p1 AS SELECT 1")
        raise RuntimeError("the app failed")

    app = mw(Routes(fail=fail, prepared=lambda conn: run(conn, "SELECT count(*) FROM pg_prepared_statements")),
             reset_sql=reset_sql)
    assert call(app, "/fail")[0] == "raised"
    assert app.pool.stats()["idle"] == 1  # the connection was kept, not discarded
    other_session_got_it = pg.execute("SELECT pg_try_advisory_lock(7)")[0][0]  # its session ends at once
    assert other_session_got_it is (not survives)
    assert call(app, "/prepared") == ("200 OK", b"1" if survives else b"0")


# -- a fenced primary (#14 item 4) ---------------------------------------------------------


@pytest.mark.parametrize(("attrs", "primary_only"), [
    (None, False), ("any", False), ("read-write", True), ("primary", True),
    ("prefer-standby", False)])
def test_session_knows_whether_the_dsn_wants_a_primary(connect, dsn, attrs, primary_only):
    conn = connect(dsn + (f" target_session_attrs={attrs}" if attrs else ""))
    assert _conn.Session(conn).primary_only is primary_only


def test_session_reads_target_session_attrs_as_libpq_resolved_it(connect, dsn, monkeypatch):
    monkeypatch.setenv("PGTARGETSESSIONATTRS", "read-write")
    assert _conn.Session(connect(dsn)).primary_only is True


@pytest.fixture
def fence(pg: PgServer) -> Iterator[Callable[[], None]]:
    """fence() makes the session server read-only the way a failover tool does; undone after the test."""
    def wait_for(value: str) -> None:
        deadline = time.monotonic() + 20
        while pg.execute("SHOW default_transaction_read_only")[0][0] != value:
            assert time.monotonic() < deadline, "the reload did not take"
            time.sleep(0.02)

    def do_fence() -> None:
        pg.execute("ALTER SYSTEM SET default_transaction_read_only = on")
        pg.execute("SELECT pg_reload_conf()")
        wait_for("on")

    try:
        yield do_fence
    finally:
        pg.execute("ALTER SYSTEM RESET default_transaction_read_only")
        pg.execute("SELECT pg_reload_conf()")
        wait_for("off")


@pytest.mark.parametrize("attrs", ["read-write", "any"])
def test_reset_discards_a_session_on_a_fenced_primary(connect, dsn, fence, attrs):
    conn = connect(f"{dsn} target_session_attrs={attrs}")
    session = _conn.Session(conn)
    run(conn, "SELECT 1")
    conn.rollback()
    fence()
    assert conn.info.parameter_status("default_transaction_read_only") == "off"  # not told yet
    run(conn, "SELECT 1")  # the first statement after the reload brings the ParameterStatus
    assert conn.info.parameter_status("default_transaction_read_only") == "on"
    reason = _conn.reset(conn, session, None)
    if attrs == "read-write":
        assert reason is _conn.READ_ONLY
    else:
        assert reason is None  # the DSN did not ask for a writable server


def test_fenced_primary_is_left_after_one_request(pg, dsn, fence, make_middleware, caplog):
    """Measures the window: requests served a read-only connection after the fence (must be 1)."""
    caplog.set_level(logging.WARNING, logger="pgpool_wsgi")
    pg.execute("DROP TABLE IF EXISTS fence_t")
    pg.execute("CREATE TABLE fence_t (x int)")

    def write(conn: Any) -> str:
        run(conn, "INSERT INTO fence_t VALUES (1)")
        return "written"

    app = make_middleware(view(write), dsn=f"{dsn} target_session_attrs=read-write", max_size=1,
                          transaction="commit")
    assert call(app) == ("200 OK", b"'written'")
    fence()
    fenced_at = time.monotonic()
    outcomes = [call(app)[0] for _ in range(5)]
    first_503 = time.monotonic() - fenced_at
    print(f"after the fence: {outcomes}; 503 within {first_503 * 1000:.1f} ms")
    assert outcomes[0] == "raised"  # ReadOnlySqlTransaction: the first statement told the connection
    assert all(o.startswith("503") for o in outcomes[1:])  # libpq now refuses the read-only server
    assert app.pool.stats()["discarded"] == 1
    assert any("read-only" in r.getMessage() for r in caplog.records)


# -- cursor and connection factories, end to end (#14 item 3) ------------------------------


def init_logging(conn: Any) -> None:
    conn.initialize(logging.getLogger("pgpool_wsgi.test.sql"))


@pytest.mark.parametrize("options", [
    pytest.param({"connect_kwargs": {"cursor_factory": psycopg2.extras.RealDictCursor}}, id="RealDictCursor"),
    pytest.param({"connect_kwargs": {"cursor_factory": psycopg2.extras.NamedTupleCursor}}, id="NamedTupleCursor"),
    pytest.param({"connect_kwargs": {"connection_factory": psycopg2.extras.LoggingConnection},
                  "configure": init_logging}, id="LoggingConnection"),
    pytest.param({"connect_kwargs": {"connection_factory": psycopg2.extras.DictConnection}}, id="DictConnection"),
    pytest.param({"connect_kwargs": {"connection_factory": psycopg2.extras.RealDictConnection}},
                 id="RealDictConnection"),
])
@pytest.mark.parametrize("check", ["auto", "ping"])
def test_first_request_with_cursor_and_connection_factories(dsn, make_middleware, caplog, options, check):
    caplog.set_level(logging.DEBUG, logger="pgpool_wsgi")

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        conn = environ["pgpool.conn"]
        with conn.cursor() as cur:
            cur.execute("SELECT 41 + 1 AS answer")
            row = cur.fetchone()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [f"{conn.autocommit} {row['answer'] if isinstance(row, dict) else row[0]}".encode()]

    # max_size above the server's max_connections: the capacity check must run and warn.
    middleware = make_middleware(app, dsn=dsn, max_size=1000, check=check, ping_after=0, **options)
    for _ in range(2):  # the second checkout pings with check = ping
        assert call(middleware) == ("200 OK", b"False 42")
    assert sum("this deployment may open" in r.getMessage() for r in caplog.records) == 1
    assert middleware.pool.stats()["discarded"] == 0


def test_ping_through_the_pool_with_a_logging_connection(dsn):
    out = io.StringIO()
    pool = ConnectionPool(dsn, max_size=1, check="ping", ping_after=0,
                          connect_kwargs={"connection_factory": psycopg2.extras.LoggingConnection},
                          configure=lambda conn: conn.initialize(out))
    try:
        for _ in range(3):
            with pool.connection() as conn, conn.cursor() as cur:
                cur.execute("SELECT 'mine'")
    finally:
        pool.close()
    assert out.getvalue().count("SELECT 'mine'") == 3 and "SELECT 1" not in out.getvalue()


def test_the_recipe_survives_an_ini_file(tmp_path, dsn, pg):
    """PasteDeploy keeps a ';' inside a value: the README's ini line gives the two statements."""
    from paste.deploy import loadapp

    (tmp_path / "reset.ini").write_text(
        "[filter-app:main]\nuse = egg:pgpool_wsgi#pgpool\nnext = inner\n"
        f"dsn = {dsn}\nmax_size = 1\nreset_sql = {RECIPE}\n\n"
        "[app:inner]\nuse = call:tests.pasteapp:app_factory\n")
    middleware = loadapp("config:reset.ini", relative_to=str(tmp_path))
    try:
        assert middleware.pool.reset_sql == RECIPE
        with middleware.pool.connection() as conn:
            run(conn, "SELECT pg_advisory_lock(8)")
        assert pg.execute("SELECT pg_try_advisory_lock(8)")[0][0] is True
    finally:
        middleware.pool.close()


# -- the pool's fast-path test (for pool.putconn) -------------------------------------------


def test_untouched_is_false_whenever_reset_has_work(connect, dsn):
    conn = connect()
    session = _conn.Session(conn)
    assert _conn.untouched(conn, session) is True
    changes: list[Callable[[Any], Any]] = [
        lambda c: run(c, "SELECT 1"),
        lambda c: run(c, "DO $$BEGIN RAISE NOTICE 'x'; END$$") or c.commit(),
        lambda c: setattr(c, "autocommit", True),
        lambda c: c.set_session(readonly=True),
        lambda c: c.set_client_encoding("LATIN1"),
        failed_prepare,
    ]
    for change in changes:
        change(conn)
        assert _conn.untouched(conn, session) is False, change
        assert _conn.reset(conn, session, None) is None
        assert _conn.untouched(conn, session) is True
    writable = connect(f"{dsn} target_session_attrs=read-write")
    assert _conn.untouched(writable, _conn.Session(writable)) is False
