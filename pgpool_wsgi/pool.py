"""A fork-aware, thread-safe pool of psycopg2 connections.

The pool knows nothing of WSGI. Each process that uses it gets its own
:class:`~pgpool_wsgi._state.State`; a connection is only ever used by the
process that opened it, and a child drops what it inherited without sending
a byte on those sockets. Checkout and return have a short fast path (the
fork mark's byte, one lock round, a few attribute reads); everything else, including all
network I/O, happens outside the lock on slower paths.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

from psycopg2.extensions import STATUS_READY

from . import _conn, _fork, _upkeep
from ._dsn import Target
from ._open import Opener
from ._state import CLOSED, SHED, Slot, State, Waiter
from .config import POOL, validate
from .errors import PoolClosed, PoolError, PoolTimeout

if TYPE_CHECKING:
    from psycopg2.extensions import connection
    from typing_extensions import Unpack

    from ._types import PoolKwargs, PoolStats

log = logging.getLogger("pgpool_wsgi")

_NEVER = math.inf

_getpid = os.getpid
_now = time.monotonic


class ConnectionPool(_fork.Home):
    """A pool of psycopg2 connections that is safe across ``fork()`` and threads.

    Nothing connects when the pool is built: each process opens its own
    connections on first use. Every option of the configuration table is a
    keyword argument (see the README).

    :param dsn: libpq connection string or ``postgresql://`` URL; when unset,
        ``DATABASE_URL``, then libpq's ``PG*`` environment variables.
    :param min_size: connections kept open per process once it used the pool.
    :param max_size: most connections per process.
    :param timeout: seconds a checkout waits before :class:`PoolTimeout`.
    :param connect_kwargs: passed to :func:`psycopg2.connect`.
    :param configure: ``callable(conn)`` run once on each new connection.

    ::

        pool = ConnectionPool("postgresql://app@db/app", max_size=5)
        with pool.connection() as conn:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
    """

    def __init__(self, dsn: str | None = None, **options: Unpack[PoolKwargs]) -> None:
        opts = validate({"dsn": dsn, **options} if dsn is not None else options, (POOL,))
        self.name: str = opts["name"]
        self.min_size: int = opts["min_size"]
        self.max_size: int = opts["max_size"]
        self.timeout: float = opts["timeout"]
        self.max_waiting: int = opts["max_waiting"]
        self.max_lifetime: float = opts["max_lifetime"] or _NEVER
        self.max_idle: float = opts["max_idle"] or _NEVER
        self.check: str = opts["check"]
        self.ping_after: float = opts["ping_after"]
        self.reset_sql: str | None = opts["reset_sql"]
        self.leak_timeout: float = opts["leak_timeout"] or _NEVER
        self.leak_debug: bool = opts["leak_debug"]
        # How long a connection may sit idle before the fast checkout test fails.
        self._idle_limit = min(self.max_idle, self.ping_after if self.check == "ping" else _NEVER)
        self._idle_limited = self._idle_limit < _NEVER
        self._target = Target(opts["dsn"], opts["connect_kwargs"], opts["connect_timeout"])
        self._opener = Opener(self, self._target, configure=opts["configure"], check_capacity=opts["check_capacity"],
                              max_lifetime=self.max_lifetime, idle_limit=self._idle_limit,
                              plain_reset=self.reset_sql is None)  # no reset_sql: returns may take the fast path
        self._closed = False
        super().__init__()  # per-process states; registers for the at-fork hooks
        log.info("%s: ready for %s (max_size=%d); connections open on first use",
                 self.name, self._target.describe(), self.max_size)

    def __repr__(self) -> str:
        return (f"<ConnectionPool {self.name!r} {self._target.describe()} "
                f"max_size={self.max_size} pid={self._state.pid or None}>")

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def target(self) -> Target:
        """Where this pool connects (printable; the password is masked)."""
        return self._target

    def _new_state(self, pid: int) -> State:
        return State(pid, max_size=self.max_size, min_size=self.min_size, watch=self.check != "none",
                     closed=self._closed)

    def __copy__(self) -> ConnectionPool:
        raise TypeError(f"{self.name}: a ConnectionPool cannot be copied or pickled; share the pool itself "
                        "(it is thread-safe, and each process opens its own connections)")

    def __deepcopy__(self, memo: object) -> ConnectionPool:
        return self.__copy__()

    def __reduce_ex__(self, protocol: object) -> Any:
        return self.__copy__()

    # -- checkout -------------------------------------------------------------

    def getconn(self, timeout: float | None = None, *, label: object = None) -> connection:
        """Check out a connection; wait up to ``timeout`` seconds (default: the pool's).

        ``label`` (e.g. ``"GET /path"``) names the holder in leak warnings.
        Raises :class:`PoolTimeout`, :class:`PoolClosed` or :class:`PoolError`.
        """
        state = self._state
        if not state.mark[0]:  # made in another process (a fork), or unused: no system call here
            state = self._process_state()
        now = _now()
        lock = state.lock
        slot = None
        try:
            # CPython runs signal handlers (gunicorn's SystemExit on SIGABRT,
            # KeyboardInterrupt) when a call returns, so one can raise right
            # after acquire() returned, before any statement of ours: the
            # handler below releases the lock if this thread holds it (the
            # state's lock is an RLock for _is_owned(); `with` would cost twice).
            lock.acquire()
            if state.idle and state.accepting:  # State.checkout's first branch, inlined: the hot path
                # Taken and marked out in one hold with no call in between (a signal
                # handler runs after a call: pop() would open that window) and no
                # allocation (the GC): the slot is idle or ours, never neither.
                idle = state.idle
                slot = idle[-1]
                del idle[-1]
                slot.out_since = now
                state.checkouts += 1
            else:  # the same hold as the idle check: no return can slip in between
                got = state.checkout(self.max_waiting)
            lock.release()
            if slot is not None:
                watcher = state.watcher
                if watcher is None:
                    if now >= slot.good_until:
                        slot = self._renew(state, slot, now)
                else:
                    fresh_until, ready = watcher.snapshot
                    if now >= fresh_until:
                        ready = watcher.look(now)
                    # Readable at the last look: a suspect, whenever it came back (see Watcher).
                    if now >= slot.good_until or slot.fd in ready:
                        slot = self._renew(state, slot, now)
            else:
                slot = self._acquire(state, got, self.timeout if timeout is None else timeout)
                now = _now()
                slot.out_since = now
            slot.label = label
            if now >= state.next_leak_scan:  # always, with leak_debug
                _upkeep.on_checkout(self, state, slot, now)
        except BaseException:
            if lock._is_owned():  # type: ignore[attr-defined]  # C RLock (and gevent's) have it
                lock.release()
            if slot is not None:  # the checkout did not complete: its slot goes back
                self._abandon(state, slot)
            raise
        return slot.conn  # type: ignore[no-any-return]  # Slot.conn is the driver object

    def _abandon(self, state: State, slot: Slot) -> None:
        """A checkout or return was interrupted holding a clean slot: to a waiter or idle.

        Only if it is still ours: in the pool and neither idle nor given on
        (a slot that failed its test was discarded already).
        """
        now = _now()
        with state.lock:
            ours = state.slots.get(slot.conn) is slot and slot.out_since is not None and slot not in state.idle
            kept = state.park(slot, now) if ours else True
        if not kept:
            _conn.close(slot.conn)

    def _renew(self, state: State, slot: Slot, now: float) -> Slot:
        """An idle connection failed the fast test: keep it, or replace it (I/O, no lock)."""
        try:
            reason, routine = self._unfit(state, slot, now)
        except BaseException:
            self._discard(state, slot, "interrupted while being tested")
            raise
        if reason is None:
            return slot
        try:
            self._discard(state, slot, reason, keep_place=True, routine=routine)
        except BaseException:
            with state.lock:
                state.connect_failed(checkout=True)
            raise
        return self._connect(state)

    def _unfit(self, state: State, slot: Slot, now: float) -> tuple[str | None, bool]:
        # Why an idle connection must be replaced (and whether that is routine), or None.
        if now >= slot.expires or now - slot.last_used >= self.max_idle:
            return "max_lifetime or max_idle reached", True
        if state.watcher is not None and not _conn.examine(slot.conn):
            _upkeep.drop_dead_idle(self, state)  # a restart or a purge closes them all
            return "closed by the server while idle", False
        if self.check == "ping" and now - slot.last_used > self.ping_after and not _conn.ping(slot.conn):
            return "no answer to a ping", False
        return None, False

    def _acquire(self, state: State, got: object, timeout: float) -> Slot:
        """The slow path: what State.checkout gave when nothing was idle."""
        if isinstance(got, Waiter):
            got = self._wait(state, got, timeout)
        if isinstance(got, Slot):
            return got  # just returned by another thread: fresh, no check needed
        if got == CLOSED:
            raise PoolClosed(f"{self.name}: the pool is closed")
        if got == SHED:
            raise PoolTimeout(f"{self.name}: {self.max_waiting} checkouts already waiting "
                              f"(max_waiting={self.max_waiting}, max_size={self.max_size})")
        return self._connect(state)  # CONNECT: a place is ours

    def _wait(self, state: State, waiter: Waiter, timeout: float) -> object:
        deadline = _now() + timeout
        try:
            while not waiter.wait(deadline - _now()):
                if _now() >= deadline:
                    break
            else:
                return waiter.result
        except BaseException:
            # Interrupted (a gevent.Timeout, KeyboardInterrupt...): leave the
            # line, or hand on what was given meanwhile.
            with state.lock:
                got = state.leave_line(waiter)
                orphan = state.hand_on(got, _now()) if got is not None else None
            if orphan is not None:
                _conn.close(orphan.conn)
            raise
        with state.lock:
            got = state.leave_line(waiter)
            if got is None:
                state.timeouts += 1
                in_use = len(state.slots) - len(state.idle)
        if got is not None:
            return got  # given just as the time ran out
        if self.leak_timeout < _NEVER:
            _upkeep.scan_leaks(self, state, _now())  # a leak that exhausts the pool is the one to report
        raise PoolTimeout(f"{self.name}: no connection free after waiting {timeout:g} s "
                          f"(max_size={self.max_size}, in use={in_use})")

    def _connect(self, state: State) -> Slot:
        """Open a connection in a place already reserved; give the place back on failure."""
        try:
            slot = self._opener.open(state)
        except BaseException:
            with state.lock:
                state.connect_failed(checkout=True)
            raise
        try:
            slot.out_since = slot.last_used  # out (ours) as soon as it is in the pool: an interrupt gives it back
            with state.lock:
                state.opened(slot)
        except BaseException:
            with state.lock:
                registered = state.slots.get(slot.conn) is slot
                if not registered:
                    state.connect_failed(checkout=True)
            if registered:
                self._abandon(state, slot)
            else:
                _conn.close(slot.conn)
            raise
        if state.closed:  # close() came while we connected: a closed pool hands out nothing
            self._abandon(state, slot)  # park() finds the pool closed: forgets and closes it
            raise PoolClosed(f"{self.name}: the pool was closed while connecting")
        return slot

    # -- return ---------------------------------------------------------------

    def putconn(self, conn: Any, *, discard: bool = False) -> None:
        """Give a connection back; it is rolled back and reset, or discarded.

        ``discard=True`` closes it instead (use after an error that may have
        left it broken). A connection this process inherited through
        ``fork()`` is dropped quietly.
        """
        # The fast path: nothing to reset, nothing to report, the lock free.
        # It reads attributes only (no psycopg2 call that takes the
        # connection's lock) and never waits. It is taken only by the process
        # that owns the state (the fork mark, no system call): in a child
        # forked without at-fork hooks, a return goes to _give_back, which
        # compares the pid and drops what was inherited.
        state = self._state
        slot = state.slots.get(conn)
        if slot is not None and not discard and slot.plain and state.mark[0]:
            out_since = slot.out_since
            session = slot.session
            if (out_since is not None and not conn.get_transaction_status() and conn.status == STATUS_READY
                    and not conn.notices and not conn.notifies
                    and conn.autocommit is session.autocommit and conn.isolation_level == session.isolation_level
                    and conn.readonly == session.readonly and conn.deferrable == session.deferrable
                    and conn.encoding == session.encoding):
                # The same test as _conn.untouched(), inlined (see there for
                # a client_encoding SET in SQL).
                now = _now()
                # Held no longer than leak_timeout, so never reported as a leak.
                if now < slot.expires and now - out_since <= self.leak_timeout:
                    lock = state.lock
                    parked = False
                    try:
                        lock.acquire()  # an interrupt from here on: see getconn
                        # Under the lock: the pool still open (close() may have come
                        # meanwhile) and the slot still out as we saw it (a second
                        # putconn() of the same connection racing this one finds it
                        # parked); else the slow path decides (and raises for the second).
                        if state.accepting and slot.out_since is out_since:
                            slot.last_used = now
                            slot.label = None  # may hold a request's environ
                            if self._idle_limited:  # else good_until stays at expires
                                good_until = now + self._idle_limit
                                slot.good_until = good_until if good_until < slot.expires else slot.expires
                            if state.waiters:
                                state.park(slot, now)
                            else:  # State.park, inlined: the hot path
                                slot.out_since = None
                                state.idle.append(slot)
                            parked = True
                        lock.release()
                        if parked:  # idle, or given to a waiter
                            if now >= state.next_upkeep:
                                _upkeep.run(self, state, now, self._opener.open)
                            return
                    except BaseException:
                        if lock._is_owned():  # type: ignore[attr-defined]  # C RLock (and gevent's) have it
                            lock.release()
                        # Interrupted (a signal handler's exception): the connection is
                        # clean, so it goes back all the same if it has not already.
                        if not parked and slot.out_since is out_since:  # neither parked nor given on
                            self._abandon(state, slot)
                        raise
        self._give_back(conn, discard)

    def _give_back(self, conn: Any, discard: bool) -> None:
        state = self._state
        if state.pid != _getpid():
            state = self._process_state()
        slot = state.slots.get(conn)
        if slot is None or slot.out_since is None:
            self._return_unknown(conn, slot)
            return
        now = _now()
        if now - slot.out_since > self.leak_timeout and not slot.leak_reported:
            _upkeep.report_leak(self, state, slot, now - slot.out_since, returned=True)
        try:
            reason = self._reset_reason(state, slot, discard, now)
        except BaseException:
            self._discard(state, slot, "interrupted while being reset")  # its I/O was cut short
            raise
        if reason is not None:
            self._discard(state, slot, reason, routine=reason.startswith("max_lifetime"))
            return
        with state.lock:
            slot.last_used = now
            slot.label = slot.stack = None
            good_until = now + self._idle_limit
            slot.good_until = good_until if good_until < slot.expires else slot.expires
            slot.leak_reported = False
            kept = state.park(slot, now)  # re-checks closed: close() may have come during the reset
        if not kept:
            _conn.close(conn)
            return
        if now >= state.next_upkeep:
            _upkeep.run(self, state, now, self._opener.open)

    def _reset_reason(self, state: State, slot: Slot, discard: bool, now: float) -> str | None:
        """Reset a returned connection (network I/O); why it must go, or None."""
        if discard:
            return "discarded by its user"
        if not state.accepting:
            return ""  # closed pool or uWSGI master: close quietly
        if now >= slot.expires:
            return "max_lifetime reached"
        return _conn.reset(slot.conn, slot.session, self.reset_sql)

    def _return_unknown(self, conn: Any, slot: Slot | None) -> None:
        if slot is not None:
            raise PoolError(f"{self.name}: putconn() of a connection that is not checked out")
        if self._drop_lent(conn):
            return  # checked out before this process was forked: its number is released
        raise PoolError(f"{self.name}: putconn() of a connection this pool did not hand out")

    def _discard(self, state: State, slot: Slot, reason: str, *, keep_place: bool = False,
                 routine: bool = False) -> None:
        """Forget and close a connection; its place goes to a waiter (or stays the caller's).

        ``reason`` "" closes quietly (closed pool, uWSGI master); a routine
        reason (age) is logged at INFO, anything else at WARNING.
        """
        with state.lock:
            state.forget(slot, keep_place=keep_place)
            if reason:
                state.discarded += 1
            if state.reserved < self.min_size:
                state.next_upkeep = 0.0  # the next return tops up
        if reason:
            log.log(logging.INFO if routine else logging.WARNING, "%s: %s a connection (%s)",
                    self.name, "replaced" if routine else "discarded", reason)
        _conn.close(slot.conn)

    @contextlib.contextmanager
    def connection(self, timeout: float | None = None) -> Iterator[Any]:
        """``with pool.connection() as conn:`` commits on success, rolls back on error."""
        conn = self.getconn(timeout)
        try:
            yield conn
        except BaseException as exc:
            self.putconn(conn, discard=_conn.is_broken_error(exc))
            raise
        try:
            conn.commit()
        except BaseException as exc:
            self.putconn(conn, discard=_conn.is_broken_error(exc))
            raise
        self.putconn(conn)

    # -- introspection and shutdown -------------------------------------------

    def stats(self) -> PoolStats:
        """Counters and gauges of this process (a child starts from zero)."""
        state = self._state
        if state.pid != _getpid():
            state = self._process_state()
        with state.lock:
            size, idle, waiting = len(state.slots), len(state.idle), len(state.waiters)
            counters = state.counters()
        return cast("PoolStats", {"name": self.name, "pid": state.pid, "min_size": self.min_size,
                                  "max_size": self.max_size, "size": size, "idle": idle, "in_use": size - idle,
                                  "waiting": waiting, **counters, "closed": self._closed})

    def close(self) -> None:
        """Close the idle connections; in-use ones are closed when returned."""
        self._closed = True
        state = self._state
        if state.pid != _getpid():
            self._forget(state)  # another process's connections: release, never close
            return
        with state.lock:
            idle = state.close()
        _conn.close_all(slot.conn for slot in idle)
        log.info("%s: closed (pid %d)", self.name, state.pid)

    def check_invariants(self) -> None:
        """Raise AssertionError if this process's pool state is inconsistent (for tests)."""
        state = self._state
        if state.pid == _getpid():
            state.check_invariants()
