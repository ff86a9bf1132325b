"""Health and recovery against a server we stop, restart and cut off (SPEC H1-H3, R6).

These tests own a PostgreSQL of their own, so stopping it never disturbs
the rest of the session.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import pytest

from pgpool_wsgi import ConnectionPool, PgPoolMiddleware, PoolError
from tests.pgserver import PgServer
from tests.tcpproxy import TcpProxy

pytestmark = pytest.mark.chaos


@pytest.fixture(scope="module")
def server() -> Iterator[PgServer]:
    pg = PgServer(name="chaos", ssl=False)
    try:
        pg.start()
        yield pg
    finally:
        pg.cleanup()


@pytest.fixture
def running(server: PgServer) -> Iterator[PgServer]:
    """The chaos server, guaranteed up at the start and again at the end."""
    if not server.running():
        server.start()
    yield server
    if not server.running():
        server.start()


@pytest.fixture
def build() -> Iterator[Callable[..., Any]]:
    made: list[Any] = []

    def make(kind: Callable[..., Any], *args: Any, **options: Any) -> Any:
        obj = kind(*args, **options)
        made.append(obj)
        return obj

    yield make
    for obj in made:
        (obj.pool if isinstance(obj, PgPoolMiddleware) else obj).close()


def echo_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    with environ["pgpool.conn"].cursor() as cur:
        cur.execute("SELECT %s::text, pg_backend_pid()", (environ.get("QUERY_STRING", ""),))
        token, pid = cur.fetchone()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"{token} {pid}".encode()]


def call(app: Any, token: str = "t", path: str = "/") -> tuple[str, bytes]:
    """One request through the WSGI app, as a server would make it."""
    status: list[str] = []
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": token}
    result = app(environ, lambda s, h, exc_info=None: status.append(s))
    try:
        body = b"".join(result)
    finally:
        getattr(result, "close", lambda: None)()
    return status[-1], body


def our_backends(pg: PgServer) -> list[int]:
    import os

    rows = pg.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                      (f"pgpool_wsgi pid={os.getpid()}",))
    return [r[0] for r in rows]


def terminate_ours(pg: PgServer) -> None:
    """Terminate this process's backends and wait until they are gone."""
    pg.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (our_backends(pg),))
    deadline = time.monotonic() + 10
    while our_backends(pg) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert our_backends(pg) == []
    time.sleep(0.1)  # the FATAL and the close travel to the client (through a proxy, too)


def warm(pool: ConnectionPool, n: int) -> None:
    conns = [pool.getconn() for _ in range(n)]
    for conn in conns:
        pool.putconn(conn)


# -- H1: idle connections the server closed ------------------------------------------


def test_terminated_idle_connections_never_reach_the_app(running, build):
    app = build(PgPoolMiddleware, echo_app, dsn=running.dsn(), max_size=5)
    warm(app.pool, 5)
    victims = our_backends(running)
    assert len(victims) == 5
    terminate_ours(running)
    results = [call(app, f"tok{i}") for i in range(20)]
    assert all(status == "200 OK" for status, _ in results)
    assert all(body.split()[0] == f"tok{i}".encode() for i, (_, body) in enumerate(results))
    assert {int(body.split()[1]) for _, body in results}.isdisjoint(victims)
    stats = app.pool.stats()
    assert stats["discarded"] == 5 and stats["connects"] == 6


def test_connection_killed_while_out_is_tested_after_a_fast_return(running, build):
    # Killed while checked out, no query since: it comes back clean on the
    # fast return path. The look taken while it was out saw its socket
    # readable; the next checkout (within the millisecond that look serves)
    # must test it, not take it on trust because it came back after the look.
    pool = build(ConnectionPool, running.dsn(), max_size=2)
    for _ in range(5):
        a, b = pool.getconn(), pool.getconn()
        victim = backend_of(a)
        running.execute("SELECT pg_terminate_backend(%s)", (victim,))
        deadline = time.monotonic() + 10
        while victim in our_backends(running) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)  # the FATAL and the close reach a's socket
        pool.putconn(b)
        x = pool.getconn()  # b again: its checkout takes a fresh look, which sees a readable
        pool.putconn(a)  # clean: the fast path, idle again
        y = pool.getconn()
        try:
            assert backend_of(y) != victim  # tested and replaced, not handed out dead
        finally:
            pool.putconn(y)
            pool.putconn(x)
    pool.check_invariants()
    assert pool.stats()["discarded"] == 5


def test_a_checkout_waits_for_a_look_under_way_instead_of_using_an_old_one(running, build):
    # Thread A's look is inside poll() (held there); thread B's checkout
    # comes meanwhile. B must not use the snapshot from before the server
    # closed the sessions, nor one whose freshness A claimed before polling.
    pool = build(ConnectionPool, running.dsn(), max_size=2)
    warm(pool, 2)
    time.sleep(0.01)  # the last look is stale
    terminate_ours(running)
    watcher = pool._state.watcher
    real = watcher._poll
    results: list[object] = []

    def b_checkout() -> None:
        conn = pool.getconn(timeout=5)
        try:
            results.append(backend_of(conn))
        except psycopg2.Error as exc:
            results.append(exc)
        finally:
            pool.putconn(conn)

    class HeldPoll:  # the first poll() waits (bounded) for B's checkout
        calls = 0

        def poll(self, timeout: int) -> Any:
            HeldPoll.calls += 1
            if HeldPoll.calls == 1:
                b = threading.Thread(target=b_checkout)
                b.start()
                b.join(0.5)  # the old code let B finish here, with a dead connection
            return real.poll(timeout)

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

    watcher._poll = HeldPoll()
    try:
        conn = pool.getconn(timeout=5)  # A
        backend_of(conn)
        pool.putconn(conn)
        deadline = time.monotonic() + 10
        while not results and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        watcher._poll = real
    assert len(results) == 1 and isinstance(results[0], int), results
    pool.check_invariants()


def test_descriptor_reused_after_a_broken_connection_is_still_watched(running, build):
    # A backend dies mid-query: libpq closes the socket, and the next connect
    # gets the same descriptor number. Discarding the broken connection must
    # not stop the watch on the new one.
    pool = build(ConnectionPool, running.dsn(), max_size=2)
    broken = pool.getconn()
    old_fd = broken.fileno()
    victim = backend_of(broken)
    killer = threading.Timer(0.3, running.execute, ("SELECT pg_terminate_backend(%s)", (victim,)))
    killer.start()
    with pytest.raises(psycopg2.Error), broken.cursor() as cur:
        cur.execute("SELECT pg_sleep(5)")
    killer.join(10)
    fresh = pool.getconn()
    assert fresh.fileno() == old_fd  # the precondition: the number was reused
    pool.putconn(broken, discard=True)
    fresh_pid = backend_of(fresh)
    pool.putconn(fresh)
    terminate_ours(running)  # the idle connection's backend is gone
    conn = pool.getconn()
    try:
        assert backend_of(conn) != fresh_pid  # replaced, not handed out dead
    finally:
        pool.putconn(conn)
    pool.check_invariants()
    assert pool.stats()["discarded"] == 2


def backend_of(conn: Any) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        pid: int = cur.fetchone()[0]
    conn.rollback()
    return pid


def test_idle_session_timeout_connections_are_replaced(running, build):
    dsn = running.dsn(options="'-c idle_session_timeout=300'")
    app = build(PgPoolMiddleware, echo_app, dsn=dsn, max_size=2)
    status, first = call(app)
    assert status == "200 OK"
    time.sleep(0.8)  # the server closes the idle session after 0.3 s
    status, second = call(app)
    assert status == "200 OK" and first.split()[1] != second.split()[1]
    assert app.pool.stats()["discarded"] == 1

    # Without the check the stale connection reaches the app, which fails:
    # this is what check = auto saves the app from.
    unchecked = build(PgPoolMiddleware, echo_app, dsn=dsn, max_size=2, check="none")
    assert call(unchecked)[0] == "200 OK"
    time.sleep(0.8)
    with pytest.raises(psycopg2.OperationalError):
        call(unchecked)


def test_notifications_do_not_look_like_a_dead_connection(running, build):
    pool = build(ConnectionPool, running.dsn(), max_size=1)
    with pool.connection() as conn, conn.cursor() as cur:
        cur.execute("LISTEN pgpool_test")
    running.execute("NOTIFY pgpool_test, 'hello'")
    time.sleep(0.2)
    with pool.connection() as conn:
        assert [n.payload for n in conn.notifies] == ["hello"]
    assert pool.stats()["discarded"] == 0 and pool.stats()["connects"] == 1


def test_ping_catches_links_cut_without_a_word(running, build):
    with TcpProxy(running.port) as proxy:
        dsn = running.dsn(port=proxy.port)
        pinging = build(ConnectionPool, dsn, max_size=1, check="ping", ping_after=0.1)
        auto = build(ConnectionPool, dsn, max_size=1)
        warm(pinging, 1)
        warm(auto, 1)
        assert proxy.sever() == 2
        time.sleep(0.3)
        # check = auto sees nothing (no byte arrived): the app's query fails.
        conn = auto.getconn()
        with pytest.raises(psycopg2.OperationalError), conn.cursor() as cur:
            cur.execute("SELECT 1")
        auto.putconn(conn, discard=True)
        # check = ping asks the server first and replaces the connection.
        with pinging.connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
        assert pinging.stats()["discarded"] == 1 and pinging.stats()["connects"] == 2


# -- H2: max_lifetime and max_idle ------------------------------------------------------


def test_max_lifetime_replaces_connections(running, build):
    app = build(PgPoolMiddleware, echo_app, dsn=running.dsn(), max_size=1, max_lifetime=0.3)
    first_seen: dict[bytes, float] = {}
    last_seen: dict[bytes, float] = {}
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        status, body = call(app)
        assert status == "200 OK"
        now = time.monotonic()
        first_seen.setdefault(body.split()[1], now)
        last_seen[body.split()[1]] = now
        time.sleep(0.01)
    assert len(first_seen) >= 4
    for pid, first in first_seen.items():
        assert last_seen[pid] - first < 0.3 + 0.1  # never used past its lifetime (plus a request)
    stats = app.pool.stats()
    # Each connection but the last was replaced; the last one too if its
    # final return came after its lifetime (a busy machine stretches the loop).
    assert stats["connects"] == len(first_seen)
    assert stats["discarded"] in (len(first_seen) - 1, len(first_seen))


def test_max_lifetime_enforced_on_return(running, build):
    pool = build(ConnectionPool, running.dsn(), max_size=1, max_lifetime=0.2)
    conn = pool.getconn()
    time.sleep(0.3)
    pool.putconn(conn)
    assert conn.closed and pool.stats()["size"] == 0 and pool.stats()["discarded"] == 1


def test_max_idle_closes_idle_connections_down_to_min_size(running, build):
    pool = build(ConnectionPool, running.dsn(), min_size=1, max_size=3, max_idle=0.3)
    warm(pool, 3)
    assert pool.stats()["size"] == 3
    deadline = time.monotonic() + 2
    while pool.stats()["size"] > 1 and time.monotonic() < deadline:
        pool.putconn(pool.getconn())  # one busy connection; the other two sit idle
        time.sleep(0.02)
    stats = pool.stats()
    assert stats["size"] == 1 and stats["discarded"] == 2
    deadline = time.monotonic() + 5  # backends exit shortly after our Terminate
    while len(our_backends(running)) > 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(our_backends(running)) == 1


def test_max_idle_at_checkout(running, build):
    pool = build(ConnectionPool, running.dsn(), max_size=1, max_idle=0.2)
    with pool.connection() as conn:
        first = conn
    time.sleep(0.3)
    with pool.connection() as conn:
        assert conn is not first
    assert pool.stats()["connects"] == 2


# -- H3: the server goes away and comes back ---------------------------------------------


def hammer(app: Any, seconds: float, threads: int = 4) -> list[tuple[float, float, str]]:
    """Requests from several threads for a while: (start, end, outcome) each."""
    records: list[tuple[float, float, str]] = []
    stop = time.monotonic() + seconds

    def loop() -> None:
        n = 0
        while time.monotonic() < stop and n < 20000:
            n += 1
            start = time.monotonic()
            try:
                status, _ = call(app, f"x{n}")
                outcome = status.split()[0]
            except psycopg2.Error as exc:
                outcome = f"error:{type(exc).__name__}"
            records.append((start, time.monotonic(), outcome))
            time.sleep(0.005)

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(seconds + 60)
        assert not t.is_alive(), "a request hung"
    return sorted(records)


def test_restart_during_load_gives_503s_then_recovers(running, build, caplog):
    caplog.set_level(logging.WARNING, logger="pgpool_wsgi")
    app = build(PgPoolMiddleware, echo_app, dsn=running.dsn(), max_size=4, timeout=2, connect_timeout=2)
    marks: dict[str, float] = {}

    def restart() -> None:
        time.sleep(1.0)
        marks["down"] = time.monotonic()
        running.restart("fast")
        marks["up"] = time.monotonic()

    restarter = threading.Thread(target=restart)
    restarter.start()
    records = hammer(app, 5.0)
    restarter.join(60)
    outcomes = [o for _, _, o in records]
    in_flight_errors = [o for o in outcomes if o.startswith("error")]
    assert set(outcomes) <= {"200", "503", "error:OperationalError", "error:DatabaseError"}
    assert outcomes.count("503") > 0
    assert len(in_flight_errors) <= 4  # only queries running when the server went down
    assert max(end - start for start, end, _ in records) < 2 + 2 + 1  # never longer than the timeouts
    first_ok_after = min(end for start, end, o in records if o == "200" and start >= marks["up"])
    print(f"\nrestart: {len(outcomes)} requests, {outcomes.count('503')} x 503, {len(in_flight_errors)} in-flight "
          f"errors, down {marks['up'] - marks['down']:.2f} s, first success {first_ok_after - marks['up']:.2f} s "
          "after the server was back")
    assert first_ok_after - marks["up"] < 2.0  # "within about a second", with margin
    assert all(o == "200" for start, _, o in records if start >= first_ok_after)
    assert any("503" in r.getMessage() for r in caplog.records)


def test_server_down_fails_fast_with_bounded_connect_attempts(running, build, caplog):
    caplog.set_level(logging.WARNING, logger="pgpool_wsgi")
    with TcpProxy(running.port) as proxy:
        app = build(PgPoolMiddleware, echo_app, dsn=running.dsn(port=proxy.port), max_size=4, connect_timeout=2)
        assert call(app)[0] == "200 OK"
        proxy.mode = "refuse"  # the server is "down": new connections are refused...
        terminate_ours(running)  # ...and the open one was closed
        before = proxy.accepted
        records = hammer(app, 3.0)
        attempts = proxy.accepted - before
        outcomes = [o for _, _, o in records]
        assert outcomes.count("503") == len(outcomes) > 100
        # Backoff 0.1 s doubling to 1 s: about 6 attempts in 3 s, not one per request.
        assert 2 <= attempts <= 10, attempts
        assert app.pool.stats()["connect_errors"] == attempts
        # One WARNING per 503 would bury the log: a few lines, then a count.
        lines = [r.getMessage() for r in caplog.records if ": 503, " in r.getMessage()]
        assert 1 <= len(lines) <= 5

        proxy.mode = "forward"
        back = time.monotonic()
        deadline = back + 5
        while time.monotonic() < deadline and call(app)[0] != "200 OK":
            time.sleep(0.02)
        recovered = time.monotonic() - back
        print(f"\nserver down 3 s: {len(outcomes)} requests, all 503, {attempts} connect attempts; "
              f"recovered {recovered:.2f} s after it came back")
        assert recovered < 1.5  # recovers by itself within about a second
        assert call(app)[0] == "200 OK"


def test_unresponsive_server_costs_one_connect_timeout_not_one_per_request(running, build):
    with TcpProxy(running.port) as proxy:
        proxy.mode = "silent"
        app = build(PgPoolMiddleware, echo_app, dsn=running.dsn(port=proxy.port), max_size=4, connect_timeout=2)
        records = hammer(app, 4.0)
        outcomes = [o for _, _, o in records]
        durations = sorted(end - start for start, end, _ in records)
        print(f"\nsilent host 4 s: {len(outcomes)} requests, {proxy.accepted} connect attempts, "
              f"median {durations[len(durations) // 2] * 1000:.1f} ms, longest {durations[-1]:.2f} s")
        assert set(outcomes) == {"503"}
        assert durations[-1] < 2 + 1.5  # a connect fails within connect_timeout
        assert durations[len(durations) // 2] < 0.1  # most requests fail at once
        assert proxy.accepted <= 4 + 4  # the probes, not one connect per request


def test_connect_failure_message_names_target_and_reason(running, build):
    with TcpProxy(running.port) as proxy:
        proxy.mode = "refuse"
        pool = build(ConnectionPool, running.dsn(port=proxy.port), max_size=1)
        with pytest.raises(PoolError) as info:
            pool.getconn()
        assert f"postgres@127.0.0.1:{proxy.port}/postgres" in str(info.value)
        with pytest.raises(PoolError, match="next attempt in"):
            pool.getconn()  # within the backoff window: fails at once


# -- leaks ---------------------------------------------------------------------------------


def test_leak_warning_once_with_method_and_path(running, build, caplog):
    caplog.set_level(logging.WARNING, logger="pgpool_wsgi")
    release = threading.Event()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if environ["PATH_INFO"] == "/slow":
            release.wait(10)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    mw = build(PgPoolMiddleware, app, dsn=running.dsn(), max_size=2, leak_timeout=0.2, leak_debug=True)
    slow = threading.Thread(target=call, args=(mw, "", "/slow"))
    slow.start()
    time.sleep(0.5)
    call(mw, "", "/fast")  # this checkout notices the slow one
    call(mw, "", "/fast")
    release.set()
    slow.join(10)
    leaks = [r.getMessage() for r in caplog.records if "held for" in r.getMessage()]
    assert len(leaks) == 1
    assert "GET /slow" in leaks[0] and "not returned yet" in leaks[0]
    assert "checked out at" in leaks[0] and "middleware.py" in leaks[0]
    assert mw.pool.stats()["leaks"] == 1


def test_leak_reported_on_return_when_nobody_checked_out(running, build, caplog):
    caplog.set_level(logging.WARNING, logger="pgpool_wsgi")
    pool = build(ConnectionPool, running.dsn(), max_size=1, leak_timeout=0.1)
    conn = pool.getconn(label="job 42")
    time.sleep(0.2)
    pool.putconn(conn)
    leaks = [r.getMessage() for r in caplog.records if "held for" in r.getMessage()]
    assert len(leaks) == 1 and "job 42" in leaks[0] and "and returned" in leaks[0]
