"""ConnectionPool against the real server: checkout, return, reset, waiting, discards."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg2
import psycopg2.extensions as ext
import pytest

from pgpool_wsgi import ConnectionPool, PoolClosed, PoolError, PoolTimeout, _conn
from pgpool_wsgi import pool as pool_module
from pgpool_wsgi._dsn import Target
from tests.conftest import backend_pid

STATS_KEYS = {"pid", "max_size", "size", "idle", "in_use", "waiting", "checkouts", "timeouts",
              "connects", "connect_errors", "discarded", "fork_resets"}


def test_construction_opens_nothing(pg, make_pool):
    before = pg.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'pgpool_wsgi%'")
    pool = make_pool(min_size=2, max_size=4)
    after = pg.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'pgpool_wsgi%'")
    assert before == after
    assert pool.stats()["size"] == 0


def test_checkout_gives_a_live_connection_and_stats_have_the_spec_keys(make_pool):
    pool = make_pool(max_size=3)
    conn = pool.getconn()
    assert isinstance(conn, ext.connection)
    with conn.cursor() as cur:
        cur.execute("SELECT 41 + 1")
        assert cur.fetchone() == (42,)
    stats = pool.stats()
    assert stats.keys() >= STATS_KEYS
    assert (stats["size"], stats["in_use"], stats["idle"]) == (1, 1, 0)
    pool.putconn(conn)
    stats = pool.stats()
    assert (stats["in_use"], stats["idle"], stats["checkouts"], stats["connects"]) == (0, 1, 1, 1)


def test_returned_connection_is_reused(make_pool):
    pool = make_pool(max_size=2)
    first = pool.getconn()
    pid = backend_pid(first)
    pool.putconn(first)
    second = pool.getconn()
    assert second is first and backend_pid(second) == pid
    pool.putconn(second)
    assert pool.stats()["connects"] == 1


def test_application_name_names_library_and_pid(make_pool):
    pool = make_pool()
    with pool.connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT current_setting('application_name')")
        name = cur.fetchone()[0]
    import os

    assert name == f"pgpool_wsgi pid={os.getpid()}"


def test_dsn_application_name_wins(pg, make_pool):
    pool = make_pool(dsn=pg.dsn(application_name="mine"))
    with pool.connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT current_setting('application_name')")
        assert cur.fetchone()[0] == "mine"


def test_context_manager_commits_on_success_and_rolls_back_on_error(pg, make_pool):
    pg.execute("CREATE TABLE IF NOT EXISTS cm_test (v text)")
    pg.execute("TRUNCATE cm_test")
    pool = make_pool()
    with pool.connection() as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO cm_test VALUES ('kept')")
    with pytest.raises(ZeroDivisionError), pool.connection() as conn:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO cm_test VALUES ('lost')")
        1 / 0  # noqa: B018
    assert pg.execute("SELECT v FROM cm_test") == [("kept",)]
    assert pool.stats()["in_use"] == 0 and pool.stats()["discarded"] == 0


def test_uncommitted_work_is_rolled_back_on_return(pg, make_pool):
    pg.execute("CREATE TABLE IF NOT EXISTS rb_test (v text)")
    pool = make_pool(max_size=1)
    conn = pool.getconn()
    with conn.cursor() as cur:
        cur.execute("INSERT INTO rb_test VALUES ('x')")
    assert conn.info.transaction_status == ext.TRANSACTION_STATUS_INTRANS
    pool.putconn(conn)
    again = pool.getconn()
    assert again is conn
    assert again.info.transaction_status == ext.TRANSACTION_STATUS_IDLE
    assert pg.execute("SELECT count(*) FROM rb_test") == [(0,)]
    pool.putconn(again)


def test_session_characteristics_are_restored(make_pool):
    pool = make_pool(max_size=1)
    conn = pool.getconn()
    conn.set_session(isolation_level="SERIALIZABLE", readonly=True, deferrable=True, autocommit=True)
    pool.putconn(conn)
    again = pool.getconn()
    assert again is conn
    assert (again.autocommit, again.isolation_level, again.readonly, again.deferrable) == (False, None, None, None)
    with again.cursor() as cur:
        cur.execute("SHOW transaction_isolation")
        assert cur.fetchone() == ("read committed",)
        cur.execute("SHOW transaction_read_only")
        assert cur.fetchone() == ("off",)
    pool.putconn(again)


def test_session_set_is_undone_unless_committed_and_reset_sql_clears_it(make_pool):
    plain = make_pool(max_size=1)
    conn = plain.getconn()
    with conn.cursor() as cur:
        cur.execute("SET SESSION work_mem = '7MB'")  # rolled back with the transaction
    plain.putconn(conn)
    conn = plain.getconn()
    with conn.cursor() as cur:
        cur.execute("SHOW work_mem")
        assert cur.fetchone() == ("4MB",)
        cur.execute("SET SESSION work_mem = '7MB'")
    conn.commit()  # a committed SET survives: that is what reset_sql is for
    plain.putconn(conn)
    conn = plain.getconn()
    with conn.cursor() as cur:
        cur.execute("SHOW work_mem")
        assert cur.fetchone() == ("7MB",)
    plain.putconn(conn)

    discarding = make_pool(max_size=1, reset_sql="DISCARD ALL")
    conn = discarding.getconn()
    pid = backend_pid(conn)
    with conn.cursor() as cur:
        cur.execute("SET SESSION work_mem = '7MB'")
        cur.execute("CREATE TEMP TABLE scratch (v int)")
        cur.execute("PREPARE stmt AS SELECT 1")
    conn.commit()
    discarding.putconn(conn)
    conn = discarding.getconn()
    assert backend_pid(conn) == pid
    with conn.cursor() as cur:
        cur.execute("SHOW work_mem")
        assert cur.fetchone() == ("4MB",)
        cur.execute("SELECT count(*) FROM pg_prepared_statements")
        assert cur.fetchone() == (0,)
        cur.execute("SELECT to_regclass('pg_temp.scratch')")
        assert cur.fetchone() == (None,)
    assert conn.autocommit is False
    discarding.putconn(conn)
    assert discarding.stats()["discarded"] == 0


def test_failing_reset_sql_discards(make_pool):
    pool = make_pool(max_size=1, reset_sql="SELECT no_such_function()")
    conn = pool.getconn()
    pool.putconn(conn)
    assert conn.closed
    assert pool.stats()["discarded"] == 1 and pool.stats()["size"] == 0


def test_closed_connection_is_discarded_on_return(make_pool):
    pool = make_pool(max_size=1)
    conn = pool.getconn()
    conn.close()
    pool.putconn(conn)
    assert pool.stats()["discarded"] == 1
    fresh = pool.getconn()
    assert fresh is not conn and not fresh.closed
    pool.putconn(fresh)


def test_connection_returned_while_a_query_runs_is_discarded(make_pool):
    pool = make_pool(max_size=1)
    conn = pool.getconn()
    runner = threading.Thread(target=lambda: conn.cursor().execute("SELECT pg_sleep(0.5)"))
    runner.start()
    deadline = time.monotonic() + 5
    while conn.info.transaction_status != ext.TRANSACTION_STATUS_ACTIVE and time.monotonic() < deadline:
        time.sleep(0.005)
    assert conn.info.transaction_status == ext.TRANSACTION_STATUS_ACTIVE
    pool.putconn(conn)
    runner.join(10)
    assert conn.closed and pool.stats()["discarded"] == 1 and pool.stats()["size"] == 0


def test_discard_flag_closes_the_connection(make_pool):
    pool = make_pool(max_size=1)
    conn = pool.getconn()
    pool.putconn(conn, discard=True)
    assert conn.closed and pool.stats()["discarded"] == 1 and pool.stats()["size"] == 0


def test_terminated_backend_mid_request_is_discarded(pg, make_pool):
    pool = make_pool(max_size=1, check="none")
    conn = pool.getconn()
    pid = backend_pid(conn)
    killer = threading.Timer(0.3, pg.execute, ("SELECT pg_terminate_backend(%s)", (pid,)))
    killer.start()
    with pytest.raises(psycopg2.OperationalError) as info, conn.cursor() as cur:
        cur.execute("SELECT pg_sleep(10)")
    killer.join(10)
    assert _conn.is_broken_error(info.value) or conn.closed
    pool.putconn(conn, discard=_conn.is_broken_error(info.value))
    assert pool.stats()["discarded"] == 1
    with pool.connection() as fresh:
        assert backend_pid(fresh) != pid


def test_base_exception_in_context_manager_discards(make_pool):
    class Interrupted(BaseException):
        pass

    pool = make_pool(max_size=1)
    with pytest.raises(Interrupted), pool.connection():
        raise Interrupted
    assert pool.stats()["discarded"] == 1 and pool.stats()["size"] == 0


def test_putconn_of_a_foreign_connection_is_an_error(dsn, make_pool):
    pool = make_pool()
    stranger = psycopg2.connect(dsn)
    try:
        with pytest.raises(PoolError, match="did not hand out"):
            pool.putconn(stranger)
    finally:
        stranger.close()


def test_putconn_twice_is_an_error(make_pool):
    pool = make_pool()
    conn = pool.getconn()
    pool.putconn(conn)
    with pytest.raises(PoolError, match="not checked out"):
        pool.putconn(conn)
    assert pool.stats()["idle"] == 1


def test_timeout_when_exhausted_names_size_and_seconds(make_pool):
    pool = make_pool(max_size=2, timeout=0.3)
    held = [pool.getconn(), pool.getconn()]
    started = time.monotonic()
    with pytest.raises(PoolTimeout) as info:
        pool.getconn()
    waited = time.monotonic() - started
    assert 0.25 <= waited < 5
    assert "max_size=2" in str(info.value) and "0.3 s" in str(info.value)
    assert isinstance(info.value, psycopg2.OperationalError)
    assert pool.stats()["timeouts"] == 1 and pool.stats()["waiting"] == 0
    for conn in held:
        pool.putconn(conn)


def test_getconn_timeout_argument_overrides_pool_timeout(make_pool):
    pool = make_pool(max_size=1, timeout=30)
    held = pool.getconn()
    started = time.monotonic()
    with pytest.raises(PoolTimeout):
        pool.getconn(timeout=0.1)
    assert time.monotonic() - started < 5
    pool.putconn(held)


def test_waiters_are_served_in_fifo_order(make_pool):
    pool = make_pool(max_size=1, timeout=20)
    holder = pool.getconn()
    order: list[int] = []
    errors: list[BaseException] = []

    def wait_turn(n: int) -> None:
        try:
            conn = pool.getconn()
            order.append(n)
            pool.putconn(conn)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = []
    for n in range(6):
        t = threading.Thread(target=wait_turn, args=(n,))
        t.start()
        threads.append(t)
        deadline = time.monotonic() + 5
        while pool.stats()["waiting"] < n + 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert pool.stats()["waiting"] == n + 1
    pool.putconn(holder)
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    assert errors == []
    assert order == list(range(6))
    assert pool.stats()["connects"] == 1


def test_max_waiting_sheds_load_at_once(make_pool):
    pool = make_pool(max_size=1, timeout=20, max_waiting=1)
    holder = pool.getconn()
    waiter = threading.Thread(target=lambda: pool.putconn(pool.getconn()))
    waiter.start()
    deadline = time.monotonic() + 5
    while pool.stats()["waiting"] < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    started = time.monotonic()
    with pytest.raises(PoolTimeout, match="max_waiting=1"):
        pool.getconn()
    assert time.monotonic() - started < 1
    pool.putconn(holder)
    waiter.join(10)
    assert not waiter.is_alive()


def test_discarded_connection_frees_a_place_for_a_waiter(make_pool):
    pool = make_pool(max_size=1, timeout=10)
    holder = pool.getconn()
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(pool.getconn()))
    waiter.start()
    deadline = time.monotonic() + 5
    while pool.stats()["waiting"] < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    pool.putconn(holder, discard=True)
    waiter.join(10)
    assert len(got) == 1 and got[0] is not holder and not got[0].closed
    pool.putconn(got[0])
    assert pool.stats()["connects"] == 2


def test_close_refuses_checkouts_and_wakes_waiters(make_pool):
    pool = make_pool(max_size=1, timeout=20)
    held = pool.getconn()
    idle_pool_conn = None
    outcome: list[BaseException] = []

    def wait() -> None:
        try:
            pool.getconn()
        except PoolClosed as exc:
            outcome.append(exc)

    t = threading.Thread(target=wait)
    t.start()
    deadline = time.monotonic() + 5
    while pool.stats()["waiting"] < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    pool.close()
    t.join(10)
    assert len(outcome) == 1
    with pytest.raises(PoolClosed):
        pool.getconn()
    pool.putconn(held)
    assert held.closed and idle_pool_conn is None
    assert pool.stats()["size"] == 0


def test_no_network_io_while_the_lock_is_held(make_pool, monkeypatch):
    pool = make_pool(max_size=2, reset_sql="DISCARD ALL", check="ping", ping_after=0, max_lifetime=0.5)
    calls: list[str] = []

    def guard(name: str, real: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            lock = getattr(pool._state, "lock", None)
            assert lock is None or not lock._is_owned(), f"{name} called under the pool lock"
            calls.append(name)
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(Target, "connect", guard("connect", Target.connect))
    for name in ("reset", "ping", "close", "examine"):
        monkeypatch.setattr(pool_module._conn, name, guard(name, getattr(_conn, name)))
    conn = pool.getconn()
    pool.putconn(conn)
    time.sleep(0.01)
    pool.putconn(pool.getconn())
    time.sleep(0.6)  # past max_lifetime: the next checkout closes and reconnects
    pool.putconn(pool.getconn())
    pool.putconn(pool.getconn(), discard=True)
    assert {"connect", "reset", "ping", "close"} <= set(calls)


def test_min_size_is_topped_up_after_first_use(make_pool):
    # One connect per return: no request pays for more than one it did not ask for.
    pool = make_pool(min_size=3, max_size=5)
    assert pool.stats()["size"] == 0
    pool.putconn(pool.getconn())
    assert pool.stats()["size"] == 2 and pool.stats()["idle"] == 2
    pool.putconn(pool.getconn())
    assert pool.stats()["size"] == 3 and pool.stats()["idle"] == 3
    conn = pool.getconn()
    pool.putconn(conn, discard=True)  # below min_size again: the next return tops up
    assert pool.stats()["size"] == 2
    pool.putconn(pool.getconn())
    assert pool.stats()["size"] == 3 and pool.stats()["connects"] == 4
    pool.check_invariants()


def test_configure_runs_once_per_new_connection(make_pool):
    seen: list[int] = []

    def configure(conn: Any) -> None:
        seen.append(id(conn))
        conn.autocommit = True

    pool = make_pool(max_size=2, configure=configure)
    for _ in range(3):
        with pool.connection() as conn:
            assert conn.autocommit is True
    assert len(seen) == 1


def test_connect_kwargs_reach_psycopg2(make_pool):
    class MyConn(ext.connection):
        pass

    pool = make_pool(connect_kwargs={"connection_factory": MyConn})
    with pool.connection() as conn:
        assert isinstance(conn, MyConn)


def test_repr_names_target_without_password(pg, make_pool):
    pool = make_pool(dsn=pg.url(user="pwuser", password="hunter2-secret"))
    assert "hunter2" not in repr(pool) and "pwuser@127.0.0.1" in repr(pool)


def test_pool_checks_its_options():
    from pgpool_wsgi import ConfigError

    with pytest.raises(ConfigError, match="max_sise: unknown option; did you mean 'max_size'"):
        ConnectionPool(max_sise=3)
    with pytest.raises(ConfigError, match="min_size"):
        ConnectionPool(min_size=5, max_size=2)


def test_only_one_probe_at_a_time_after_a_failed_connect(monkeypatch):
    """Pure logic (a connect that blocks, then fails): a connect begun before the
    backoff must not end the probe that a later caller started."""
    gates: dict[str, threading.Event] = {}
    inside: list[str] = []
    guard = threading.Lock()

    def fake_connect(self: Target, pid: int) -> Any:
        name = threading.current_thread().name
        with guard:
            inside.append(name)
        gates[name].wait(10)
        with guard:
            inside.remove(name)
        raise psycopg2.OperationalError("connection refused (fake)")

    monkeypatch.setattr(Target, "connect", fake_connect)
    pool = ConnectionPool("host=127.0.0.1 port=1 dbname=x", max_size=10, timeout=1)

    failures: list[str] = []

    def attempt() -> None:
        try:
            pool.getconn()
        except PoolError:
            failures.append(threading.current_thread().name)

    def client(name: str) -> threading.Thread:
        gates[name] = threading.Event()
        t = threading.Thread(target=attempt, name=name)
        t.start()
        return t

    def wait_inside(names: list[str]) -> None:
        deadline = time.monotonic() + 5
        while sorted(inside) != names and time.monotonic() < deadline:
            time.sleep(0.005)
        assert sorted(inside) == names

    a, b = client("A"), client("B")  # two connects under way, no backoff yet
    wait_inside(["A", "B"])
    gates["A"].set()
    a.join(5)  # A fails: backoff 0.1 s
    time.sleep(0.15)
    c = client("C")  # C is the probe
    wait_inside(["B", "C"])
    gates["B"].set()
    b.join(5)  # B was not the probe: C still is
    time.sleep(0.3)  # past B's retry_at
    d = client("D")
    d.join(5)  # fails at once: C is probing
    assert not d.is_alive() and sorted(inside) == ["C"]
    for gate in gates.values():
        gate.set()
    c.join(5)
    assert sorted(failures) == ["A", "B", "C", "D"]
    assert pool.stats()["connect_errors"] == 3
