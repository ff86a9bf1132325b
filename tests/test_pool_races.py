"""The pool core under interrupts, races and odd uses (issue 10 and friends), against the real server.

Each race is made deterministic by running the competing call at the exact
point where the old code left a gap (a lock release, a reset, a wait).
"""

from __future__ import annotations

import contextlib
import copy
import pickle
import sys
import threading
import time
from typing import Any

import psycopg2
import pytest

from pgpool_wsgi import ConnectionPool, PoolClosed, PoolError, PoolTimeout, _conn
from pgpool_wsgi._dsn import Target
from pgpool_wsgi._state import Waiter


def check(pool: ConnectionPool) -> dict[str, Any]:
    """The pool's own invariants, then its stats."""
    pool.check_invariants()
    return pool.stats()


def all_places_usable(pool: ConnectionPool) -> None:
    """max_size simultaneous checkouts succeed: no place was lost."""
    conns = [pool.getconn(timeout=2) for _ in range(pool.max_size)]
    for conn in conns:
        pool.putconn(conn)
    stats = check(pool)
    assert stats["in_use"] == 0 and stats["waiting"] == 0


class GapLock:
    """A lock that runs ``gap()`` once, right after the next release, while it is free."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.gap: Any = None

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return bool(self.real.acquire(blocking, timeout))

    def release(self) -> None:
        self.real.release()
        gap, self.gap = self.gap, None
        if gap is not None:
            gap()

    def _is_owned(self) -> bool:
        return bool(self.real._is_owned())

    __enter__ = acquire

    def __exit__(self, *exc: object) -> None:
        self.release()


# -- 2: the lost wakeup ----------------------------------------------------------------


def test_a_return_between_the_idle_check_and_queueing_is_not_lost(make_pool):
    pool = make_pool(max_size=1, timeout=1.5)
    held = pool.getconn()
    state = pool._state
    gap_lock = GapLock(state.lock)
    state.lock = gap_lock
    # The first release inside getconn comes after it found nothing idle.
    gap_lock.gap = lambda: pool.putconn(held)
    started = time.monotonic()
    conn = pool.getconn()  # before the fix: PoolTimeout with the connection idle
    assert time.monotonic() - started < 1
    assert conn is held
    pool.putconn(conn)
    state.lock = gap_lock.real
    all_places_usable(pool)


# -- 3: BaseException at every blocking point --------------------------------------------


def test_interrupted_wait_after_being_given_a_connection_hands_it_on(make_pool, monkeypatch):
    pool = make_pool(max_size=1, timeout=5)
    held = pool.getconn()
    real_wait = Waiter.wait

    def wait(self: Waiter, timeout: float) -> bool:
        pool.putconn(held)  # the return hands the connection to this waiter...
        real_wait(self, 0.01)
        raise KeyboardInterrupt  # ...which is interrupted before it takes it

    monkeypatch.setattr(Waiter, "wait", wait)
    with pytest.raises(KeyboardInterrupt):
        pool.getconn()
    monkeypatch.undo()
    all_places_usable(pool)
    assert pool.getconn(timeout=0.5) is held  # it went back to idle, still open
    pool.putconn(held)


def test_interrupted_wait_leaves_the_line(make_pool, monkeypatch):
    pool = make_pool(max_size=1, timeout=5)
    held = pool.getconn()

    def wait(self: Waiter, timeout: float) -> bool:
        raise KeyboardInterrupt

    monkeypatch.setattr(Waiter, "wait", wait)
    with pytest.raises(KeyboardInterrupt):
        pool.getconn()
    monkeypatch.undo()
    assert check(pool)["waiting"] == 0
    pool.putconn(held)  # before the fix: handed to the ghost waiter and lost
    all_places_usable(pool)


def test_huge_timeout_waits_instead_of_overflowing(make_pool):
    pool = make_pool(max_size=1)
    held = pool.getconn()
    got: list[Any] = []
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            got.append(pool.getconn(timeout=1e10))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    t = threading.Thread(target=wait)
    t.start()
    deadline = time.monotonic() + 5
    while not check(pool)["waiting"] and not errors and time.monotonic() < deadline:
        time.sleep(0.005)
    pool.putconn(held)
    t.join(10)
    assert errors == [] and got == [held]
    pool.putconn(held)
    all_places_usable(pool)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit], ids=["KeyboardInterrupt", "SystemExit"])
def test_interrupted_reset_on_return_discards_and_frees_the_place(make_pool, monkeypatch, exc):
    pool = make_pool(max_size=1, timeout=1)
    conn = pool.getconn()
    with conn.cursor() as cur:
        cur.execute("SELECT 1")  # in a transaction: the return takes the slow path

    def reset(*args: Any) -> None:
        raise exc

    monkeypatch.setattr(_conn, "reset", reset)
    with pytest.raises(exc):
        pool.putconn(conn)
    monkeypatch.undo()
    assert conn.closed  # its I/O was interrupted: never reused
    stats = check(pool)
    assert stats["size"] == 0 and stats["in_use"] == 0
    all_places_usable(pool)


def test_interrupted_ping_discards_and_frees_the_place(make_pool, monkeypatch):
    pool = make_pool(max_size=1, timeout=1, check="ping", ping_after=0)
    conn = pool.getconn()
    pool.putconn(conn)
    time.sleep(0.01)

    def ping(c: Any) -> bool:
        raise KeyboardInterrupt

    monkeypatch.setattr(_conn, "ping", ping)
    with pytest.raises(KeyboardInterrupt):
        pool.getconn()
    monkeypatch.undo()
    assert conn.closed
    stats = check(pool)
    assert stats["size"] == 0 and stats["in_use"] == 0
    all_places_usable(pool)


def test_interrupted_configure_frees_the_place(make_pool):
    calls: list[int] = []

    def configure(conn: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt

    pool = make_pool(max_size=1, timeout=1, configure=configure)
    with pytest.raises(KeyboardInterrupt):
        pool.getconn()
    stats = check(pool)
    assert stats["size"] == 0 and stats["connects"] == 0
    all_places_usable(pool)


def test_interrupted_top_up_frees_the_place(make_pool, monkeypatch):
    pool = make_pool(min_size=2, max_size=2, timeout=1)
    conn = pool.getconn()
    real = Target.connect

    def connect(self: Target, pid: int) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(Target, "connect", connect)
    with pytest.raises(KeyboardInterrupt):
        pool.putconn(conn)  # the top-up after the return is interrupted
    monkeypatch.setattr(Target, "connect", real)
    check(pool)
    all_places_usable(pool)


# -- 5: close() racing a return or a top-up ----------------------------------------------


def test_close_during_a_slow_return_closes_the_connection(make_pool, monkeypatch):
    pool = make_pool(max_size=2)
    conn = pool.getconn()
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
    real_reset = _conn.reset

    def reset(*args: Any) -> Any:
        reason = real_reset(*args)
        pool.close()  # lands between the reset and parking the connection
        return reason

    monkeypatch.setattr(_conn, "reset", reset)
    pool.putconn(conn)
    assert conn.closed
    assert check(pool)["size"] == 0


def test_close_during_a_top_up_closes_the_new_connection(make_pool, monkeypatch):
    pool = make_pool(min_size=2, max_size=2)
    conn = pool.getconn()
    opened: list[Any] = []
    real = Target.connect

    def connect(self: Target, pid: int) -> Any:
        new = real(self, pid)
        opened.append(new)
        pool.close()  # while the top-up connects
        return new

    monkeypatch.setattr(Target, "connect", connect)
    pool.putconn(conn)
    assert opened and all(c.closed for c in opened)
    assert check(pool)["size"] == 0


# -- 6: leaks on the timeout path --------------------------------------------------------


def test_leak_is_reported_when_it_exhausts_the_pool(make_pool, pool_log):
    pool = make_pool(max_size=1, timeout=0.3, leak_timeout=0.1)
    held = pool.getconn(label="job 7")
    time.sleep(0.15)
    with pytest.raises(PoolTimeout):
        pool.getconn()
    leaks = [r.getMessage() for r in pool_log.records if "held for" in r.getMessage()]
    assert len(leaks) == 1 and "job 7" in leaks[0]
    pool.putconn(held)


def test_leak_warnings_are_throttled(make_pool, pool_log):
    pool = make_pool(max_size=20, leak_timeout=0.01)
    conns = [pool.getconn() for _ in range(20)]
    time.sleep(0.05)
    for conn in conns:
        pool.putconn(conn)  # 20 leaks reported on return
    assert pool.stats()["leaks"] == 20
    lines = [r.getMessage() for r in pool_log.records if "held for" in r.getMessage()]
    assert 1 <= len(lines) <= 5
    time.sleep(0.01)


# -- issue 14 item 1: a failing configure is a failed connect ----------------------------


def test_failing_configure_counts_backs_off_and_warns(make_pool, pool_log):
    calls: list[int] = []

    def configure(conn: Any) -> None:
        calls.append(1)
        with conn.cursor() as cur:
            cur.execute("SELECT no_such_function()")

    pool = make_pool(max_size=2, configure=configure)
    with pytest.raises(PoolError, match="configure"):
        pool.getconn()
    with pytest.raises(PoolError, match="cannot reach"):
        pool.getconn()  # within the backoff: no new connect
    stats = check(pool)
    assert len(calls) == 1
    assert stats["connects"] == 0 and stats["connect_errors"] == 1 and stats["unreachable"] == 1
    assert stats["size"] == 0 and stats["in_use"] == 0
    warnings = [r.getMessage() for r in pool_log.records if r.levelname == "WARNING"]
    assert any("configure" in w and "UndefinedFunction" in w for w in warnings)


def test_failing_configure_answers_503(dsn, make_middleware):
    def configure(conn: Any) -> None:
        raise psycopg2.ProgrammingError("hstore type not found")

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    mw = make_middleware(app, dsn=dsn, configure=configure)
    status: list[str] = []
    body = b"".join(mw({"REQUEST_METHOD": "GET", "PATH_INFO": "/"}, lambda s, h, exc_info=None: status.append(s)))
    assert status[-1].startswith("503") and body


# -- issue 14 item 8: errors per kind -------------------------------------------------------


def test_shed_checkouts_are_counted(make_pool):
    pool = make_pool(max_size=1, timeout=5, max_waiting=1)
    held = pool.getconn()
    t = threading.Thread(target=lambda: pool.putconn(pool.getconn()))
    t.start()
    deadline = time.monotonic() + 5
    while check(pool)["waiting"] < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    with pytest.raises(PoolTimeout):
        pool.getconn()
    pool.putconn(held)
    t.join(10)
    stats = check(pool)
    assert stats["shed"] == 1 and stats["timeouts"] == 1


# -- issue 11 item 7: min_size costs a request at most one connect --------------------------


def test_min_size_top_up_opens_one_connection_per_return(make_pool):
    pool = make_pool(min_size=4, max_size=5)
    pool.putconn(pool.getconn())
    assert pool.stats()["connects"] == 2  # its own, and one for min_size
    for _ in range(5):
        pool.putconn(pool.getconn())
    stats = check(pool)
    assert stats["size"] == 4 and stats["connects"] == 4


# -- issue 16 item 8: no copies ---------------------------------------------------------------


@pytest.mark.parametrize("how", [copy.copy, copy.deepcopy, pickle.dumps], ids=["copy", "deepcopy", "pickle"])
def test_a_pool_cannot_be_copied_or_pickled(make_pool, how):
    pool = make_pool()
    with pytest.raises(TypeError, match="cannot be copied or pickled"):
        how(pool)


# -- the return fast path's contract with _conn.reset ---------------------------------------


@pytest.mark.parametrize("leftover", ["notice", "notify", "prepared"])
def test_leftovers_take_the_slow_path(make_pool, monkeypatch, leftover):
    pool = make_pool(max_size=1)
    conn = pool.getconn()
    pool.putconn(conn)
    conn = pool.getconn()
    resets: list[Any] = []
    real_reset = _conn.reset
    monkeypatch.setattr(_conn, "reset", lambda *a: resets.append(a) or real_reset(*a))
    if leftover == "notice":
        conn.notices.append("NOTICE:  secret for alice\n")
    elif leftover == "notify":
        conn.notifies.append(psycopg2.extensions.Notify(1, "chan", "x"))
    else:
        conn.tpc_begin(conn.xid(1, "gtrid", "bqual"))
        with pytest.raises(psycopg2.Error):
            conn.tpc_prepare()  # max_prepared_transactions = 0: fails, status not READY
    pool.putconn(conn)
    assert len(resets) == 1


def test_close_during_a_checkouts_connect_hands_out_nothing(make_pool, monkeypatch):
    pool = make_pool(max_size=2)
    opened: list[Any] = []
    real = Target.connect

    def connect(self: Target, pid: int) -> Any:
        new = real(self, pid)
        opened.append(new)
        pool.close()
        return new

    monkeypatch.setattr(Target, "connect", connect)
    with pytest.raises(PoolClosed):
        pool.getconn()
    assert opened and opened[0].closed
    assert check(pool)["size"] == 0


# -- exceptions raised by signal handlers on the hot paths ---------------------------------


class Boom(BaseException):
    """What a signal handler raises (gunicorn's SystemExit on SIGABRT, KeyboardInterrupt)."""


class InterruptingLock(GapLock):
    """A lock whose release raises Boom once ``when()`` holds: an exception delivered right after a hold."""

    def __init__(self, real: Any, when: Any) -> None:
        super().__init__(real)
        self.when = when
        self.fired = False

    def release(self) -> None:
        self.real.release()
        if not self.fired and self.when():
            self.fired = True
            raise Boom


def held(lock: Any) -> bool:
    """Is the lock held, by this thread or another?"""
    if lock._is_owned() or not lock.acquire(False):
        return True
    lock.release()
    return False


def test_signal_handler_exceptions_leave_no_lock_held_and_no_place_lost(make_pool):
    import signal

    pool = make_pool(max_size=3, timeout=1)
    all_places_usable(pool)
    state = pool._state
    armed = [False]

    def handler(signum: int, frame: Any) -> None:
        if armed[0]:
            armed[0] = False
            raise Boom

    previous = signal.signal(signal.SIGALRM, handler)
    booms = 0
    problem = None
    signal.setitimer(signal.ITIMER_REAL, 0.00037, 0.00037)
    try:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline and problem is None and booms < 3000:
            conn = None
            try:
                armed[0] = True
                conn = pool.getconn()
                pool.putconn(conn)
                armed[0] = False
            except Boom:
                booms += 1
                armed[0] = False
                if held(state.lock):
                    problem = "the pool lock is left held"
                elif conn is not None:
                    with contextlib.suppress(PoolError):  # given back before the interrupt
                        pool.putconn(conn)
                orphans = [s for s in state.slots.values() if s.out_since is None and s not in state.idle]
                if problem is None and orphans:
                    problem = f"{len(orphans)} slot(s) neither idle nor out"
    finally:
        armed[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, previous)
        while state.lock._is_owned():
            state.lock.release()  # let the fixture close the pool
    assert problem is None, f"{problem} (after {booms} interrupts)"
    assert booms > 0
    all_places_usable(pool)


def test_interrupted_look_at_checkout_gives_the_slot_back(make_pool, monkeypatch):
    pool = make_pool(max_size=1, timeout=1)
    all_places_usable(pool)
    time.sleep(0.01)  # the last look is stale: the checkout looks

    def look(self: Any, now: float, **kwargs: Any) -> Any:
        raise Boom

    monkeypatch.setattr(_conn.Watcher, "look", look)
    with pytest.raises(Boom):
        pool.getconn()
    monkeypatch.undo()
    stats = check(pool)
    assert stats["size"] == 1 and stats["idle"] == 1
    all_places_usable(pool)


def test_interrupt_after_a_connect_is_registered_gives_the_slot_back(make_pool, monkeypatch):
    from pgpool_wsgi._state import State

    pool = make_pool(max_size=1, timeout=1)
    real = State.opened

    def opened(self: State, slot: Any) -> None:
        real(self, slot)
        raise Boom  # as if delivered right after the call returned

    monkeypatch.setattr(State, "opened", opened)
    with pytest.raises(Boom):
        pool.getconn()
    monkeypatch.undo()
    stats = check(pool)
    assert stats["size"] == 1 and stats["idle"] == 1 and stats["in_use"] == 0
    all_places_usable(pool)


def test_interrupt_right_after_the_probe_flag_is_set_does_not_block_connects(pg, make_pool):
    pool = make_pool(dsn=pg.dsn(port=1), max_size=2, timeout=1)  # nothing listens: connects fail
    with pytest.raises(PoolError):
        pool.getconn()
    state = pool._state
    time.sleep(0.15)  # past the first backoff: the next connect probes
    pool._target = pool._opener.target = Target(pg.dsn(), {}, 5)  # the server is back
    state.lock = InterruptingLock(state.lock, lambda: state.probing)
    with pytest.raises(Boom):
        pool.getconn()
    assert state.lock.fired and not state.probing
    conn = pool.getconn()  # not refused for good
    pool.putconn(conn)
    all_places_usable(pool)


def test_interrupt_right_after_the_top_up_flag_is_set_loses_no_place(make_pool):
    pool = make_pool(min_size=2, max_size=2, timeout=1)
    conn = pool.getconn()
    state = pool._state
    state.lock = InterruptingLock(state.lock, lambda: state.filling)
    with pytest.raises(Boom):
        pool.putconn(conn)  # the top-up after the return is interrupted
    assert state.lock.fired and not state.filling
    check(pool)
    all_places_usable(pool)
    assert check(pool)["size"] == 2  # and top-ups still happen


def test_two_racing_returns_of_one_connection_park_it_once(make_pool):
    """An application bug (the same connection returned twice at once) is answered with
    PoolError for one of them; the connection is never parked twice (two holders later)."""
    pool = make_pool(max_size=2, timeout=2)
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(1500):
            conn = pool.getconn()
            barrier = threading.Barrier(2)
            errors: list[PoolError] = []

            def give_back(conn: Any = conn, barrier: threading.Barrier = barrier,
                          errors: list[PoolError] = errors) -> None:
                barrier.wait()
                try:
                    pool.putconn(conn)
                except PoolError as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=give_back) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(10)
            assert not any(t.is_alive() for t in threads)
            assert len(errors) == 1, "both returns were accepted"
            pool._state.check_invariants()
    finally:
        sys.setswitchinterval(previous)
    first, second = pool.getconn(), pool.getconn()
    assert first is not second
    pool.putconn(first)
    pool.putconn(second)


def test_a_finaliser_returning_a_connection_mid_checkout_is_not_queued_beside(make_pool):
    """A wrapper in a reference cycle returns its connection from __del__; the cyclic GC runs
    it on an allocation inside the checkout's lock hold. The checkout must take that
    connection, not queue behind it until PoolTimeout."""
    import gc

    pool = make_pool(max_size=1, timeout=1.5)

    class Handle:  # an application's "give it back when dropped" wrapper
        def __init__(self, conn: Any) -> None:
            self.conn = conn
            self.me = self  # a cycle: only the collector frees it

        def __del__(self) -> None:
            pool.putconn(self.conn)

    Handle(pool.getconn())  # garbage now; the pool is exhausted
    old = gc.get_threshold()
    gc.set_threshold(1)  # the next tracked allocation runs a collection
    try:
        conn = pool.getconn()
    finally:
        gc.set_threshold(*old)
    pool._state.check_invariants()
    pool.putconn(conn)
    assert pool.stats()["timeouts"] == 0
