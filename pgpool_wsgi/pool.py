"""A fork-aware, thread-safe pool of psycopg2 connections.

The pool knows nothing of WSGI. Each process that uses it gets its own
:class:`~pgpool_wsgi._state.State`; a connection is only ever used by the
process that opened it, and a child drops what it inherited without sending
a byte on those sockets.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any

import psycopg2

from . import _conn, _fork
from ._dsn import Target
from ._state import CLOSED, CONNECT, State, Unused, Waiter
from ._state import Slot as _Slot
from .config import POOL, validate
from .errors import PoolClosed, PoolError, PoolTimeout

log = logging.getLogger("pgpool_wsgi")

_BACKOFF_FIRST = 0.1  # seconds after the first failed connect
_BACKOFF_MAX = 1.0  # recovery within about a second of the server coming back
_LIFETIME_JITTER = 0.1

_getpid = os.getpid
_now = time.monotonic


class ConnectionPool:
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

    def __init__(self, dsn: str | None = None, **options: Any) -> None:
        opts = validate({"dsn": dsn, **options} if dsn is not None else options, (POOL,))
        self.name: str = opts["name"]
        self.min_size: int = opts["min_size"]
        self.max_size: int = opts["max_size"]
        self.timeout: float = opts["timeout"]
        self._max_waiting: int = opts["max_waiting"]
        self._max_lifetime: float = opts["max_lifetime"]
        self._max_idle: float = opts["max_idle"]
        self._check: str = opts["check"]
        self._ping_after: float = opts["ping_after"]
        self._reset_sql: str | None = opts["reset_sql"]
        self._leak_timeout: float = opts["leak_timeout"]
        self._leak_debug: bool = opts["leak_debug"]
        self._configure = opts["configure"]
        self._target = Target(opts["dsn"], opts["connect_kwargs"], opts["connect_timeout"])
        self._closed = False
        self._state: State = Unused()
        self._states: dict[int, State] = {}
        self._inherited: dict[int, Any] = {}  # id -> connection checked out when we forked
        _fork.register(self)

    def __repr__(self) -> str:
        return (f"<ConnectionPool {self.name!r} {self._target.describe()} "
                f"max_size={self.max_size} pid={self._state.pid or None}>")

    @property
    def closed(self) -> bool:
        return self._closed

    # -- processes ------------------------------------------------------------

    def _process_state(self) -> State:
        """This process's state, made on first use here (after a fork: reset)."""
        pid = _getpid()
        state = self._states.get(pid)
        if state is not None:
            return state
        fresh = State(pid)
        # setdefault is atomic: threads racing here all get the same state.
        state = self._states.setdefault(pid, fresh)
        if state is not fresh:
            return state
        old, self._state = self._state, state
        for other in [p for p in self._states if p != pid]:
            self._states.pop(other, None)
        if old.pid:
            dropped = self._forget(old)
            state.fork_resets += 1
            log.info("%s: fork detected (pid %d -> %d): dropped %d inherited connection(s)",
                     self.name, old.pid, pid, dropped)
        if self.min_size:
            self._fill_later(state)
        return state

    def _forget(self, old: State) -> int:
        """Release the sockets of another process's connections; no I/O on them."""
        if old.dropped is None:
            old.dropped = len(old.slots)
            for slot in list(old.slots.values()):
                _conn.drop_inherited(slot.conn)
            # Connections checked out at fork time may still come back here.
            self._inherited = {id(s.conn): s.conn for s in old.slots.values() if s.out_since is not None}
            old.idle = []
        return old.dropped

    def _after_fork_in_child(self) -> None:
        # Python's at-fork hook: release inherited sockets right away. Makes
        # no lock (gevent may patch threading later) and takes none.
        state = self._state
        if state.pid and state.pid != _getpid():
            self._forget(state)

    def _before_fork(self) -> None:
        # In the parent, before os.fork(): close our idle connections so a
        # pre-forking master (gunicorn --preload) keeps none. Never wait for
        # the lock here: its holder may be the thread that is forking.
        state = self._state
        if state.pid != _getpid() or not state.lock.acquire(blocking=False):
            return
        try:
            idle, state.idle = state.idle, []
            for slot in idle:
                state.slots.pop(id(slot.conn), None)
            state.reserved -= len(idle)
        finally:
            state.lock.release()
        for slot in idle:
            _conn.close(slot.conn)

    # -- checkout -------------------------------------------------------------

    def getconn(self, timeout: float | None = None, *, label: object = None) -> Any:
        """Check out a connection; wait up to ``timeout`` seconds (default: the pool's).

        ``label`` (e.g. ``"GET /path"``) names the holder in leak warnings.
        Raises :class:`PoolTimeout`, :class:`PoolClosed` or :class:`PoolError`.
        """
        state = self._state
        if state.pid != _getpid():
            state = self._process_state()
        slot = self._acquire(state, self.timeout if timeout is None else timeout)
        now = _now()
        slot.out_since = now
        slot.label = label
        if self._leak_debug:
            slot.stack = "".join(traceback.format_stack(limit=12)[:-1])
        if self._leak_timeout and now >= state.next_leak_scan:
            self._scan_leaks(state, now)
        return slot.conn

    def _acquire(self, state: State, timeout: float) -> _Slot:
        slot: _Slot | None = None
        waiter: Waiter | None = None
        shed = False
        # Under the lock only pick or reserve; every I/O comes after.
        # A checkout is counted when it is given a connection or a place.
        with state.lock:
            if self._closed:
                raise PoolClosed(f"{self.name}: the pool is closed")
            if state.idle:
                slot = state.idle.pop()
                state.checkouts += 1
            elif state.reserved < self.max_size:
                state.reserved += 1
                state.checkouts += 1
            elif self._max_waiting and len(state.waiters) >= self._max_waiting:
                state.timeouts += 1
                shed = True
            else:
                waiter = Waiter()
                state.waiters.append(waiter)
        if shed:
            raise PoolTimeout(f"{self.name}: {self._max_waiting} checkouts already waiting "
                              f"(max_waiting={self._max_waiting}, max_size={self.max_size})")
        if slot is not None:
            if self._usable(slot):
                return slot
            self._discard(state, slot, "dead or expired at checkout", keep_place=True)
        elif waiter is not None:
            got = self._wait(state, waiter, timeout)
            if got is CLOSED:
                raise PoolClosed(f"{self.name}: the pool was closed while waiting")
            if isinstance(got, _Slot):
                return got  # just returned by another thread: fresh, no check needed
        return self._connect(state)

    def _wait(self, state: State, waiter: Waiter, timeout: float) -> object:
        if waiter.wait(timeout):
            return waiter.result
        with state.lock:
            try:
                state.waiters.remove(waiter)
            except ValueError:
                lost_race = True  # a giver took us off the line: its gift is on the way
            else:
                lost_race = False
                state.timeouts += 1
                in_use = len(state.slots) - len(state.idle)
        if lost_race:
            return waiter.take()
        raise PoolTimeout(f"{self.name}: no connection free after waiting {timeout:g} s "
                          f"(max_size={self.max_size}, in use={in_use})")

    def _usable(self, slot: _Slot) -> bool:
        now = _now()
        if now >= slot.expires:
            return False
        if self._max_idle and now - slot.last_used > self._max_idle:
            return False
        if self._check == "none":
            return True
        if not _conn.is_alive(slot.conn):
            return False
        if self._check == "ping" and now - slot.last_used > self._ping_after:
            return _conn.ping(slot.conn)
        return True

    def _connect(self, state: State) -> _Slot:
        """Open a connection in a place already reserved; give it back on failure."""
        try:
            slot = self._open(state)
        except BaseException:
            with state.lock:
                state.reserved -= 1
                state.checkouts -= 1
                self._hand_place(state)
            raise
        slot.out_since = _now()
        with state.lock:
            state.slots[id(slot.conn)] = slot
        return slot

    def _open(self, state: State) -> _Slot:
        now = _now()
        with state.lock:
            # After a failed connect, one caller probes; the rest fail fast.
            if state.backoff and (now < state.retry_at or state.probing):
                wait = max(state.retry_at - now, 0.0)
                raise PoolError(f"{self.name}: cannot reach {self._target.describe()} "
                                f"(last connect failed; next attempt in {wait:.1f} s)")
            state.probing = bool(state.backoff)
        try:
            conn = self._target.connect(state.pid)
        except psycopg2.Error as exc:
            with state.lock:
                state.connect_errors += 1
                state.backoff = min(max(state.backoff * 2, _BACKOFF_FIRST), _BACKOFF_MAX)
                state.retry_at = _now() + state.backoff
            reason = self._target.scrub(str(exc).strip())
            log.warning("%s: connect to %s failed: %s", self.name, self._target.describe(), reason)
            raise PoolError(f"{self.name}: cannot connect to {self._target.describe()}: {reason}") from None
        finally:
            state.probing = False
        with state.lock:
            state.connects += 1
            state.backoff = 0.0
        if self._configure is not None:
            try:
                self._configure(conn)
                if conn.info.transaction_status != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
                    conn.commit()
            except BaseException:
                _conn.close(conn)
                raise
        lifetime = self._max_lifetime * (1 - random.random() * _LIFETIME_JITTER) if self._max_lifetime else 1e18
        return _Slot(conn, _conn.Session(conn), now + lifetime, now)

    # -- return ---------------------------------------------------------------

    def putconn(self, conn: Any, *, discard: bool = False) -> None:
        """Give a connection back; it is rolled back and reset, or discarded.

        ``discard=True`` closes it instead (use after an error that may have
        left it broken). A connection this process inherited through
        ``fork()`` is dropped quietly.
        """
        state = self._state
        if state.pid != _getpid():
            state = self._process_state()
        slot = state.slots.get(id(conn))
        if slot is None or slot.conn is not conn:
            if self._inherited.pop(id(conn), None) is conn:
                _conn.drop_inherited(conn)
                return
            raise PoolError(f"{self.name}: putconn() of a connection this pool did not hand out")
        out_since = slot.out_since
        if out_since is None:
            raise PoolError(f"{self.name}: putconn() of a connection that is not checked out")
        slot.out_since = None
        now = _now()
        if self._leak_timeout and not slot.leak_reported and now - out_since > self._leak_timeout:
            self._report_leak(state, slot, now - out_since, returned=True)
        if discard:
            reason: str | None = "discarded by its user"
        elif self._closed or state.is_uwsgi_master:
            reason = ""
        else:
            reason = _conn.reset(conn, slot.session, self._reset_sql)
            if reason is None and now >= slot.expires:
                reason = "max_lifetime reached"
        if reason is None:
            slot.last_used = now
            slot.label = slot.stack = None
            slot.leak_reported = False
            with state.lock:
                if state.waiters:
                    slot.out_since = now
                    state.checkouts += 1
                    state.waiters.popleft().give(slot)
                else:
                    state.idle.append(slot)
            return
        self._discard(state, slot, reason)

    def _discard(self, state: State, slot: _Slot, reason: str, *, keep_place: bool = False) -> None:
        """Forget and close a connection; its place goes to a waiter (or stays ours)."""
        with state.lock:
            state.slots.pop(id(slot.conn), None)
            if reason:
                state.discarded += 1
            if not keep_place:
                state.reserved -= 1
                self._hand_place(state)
        if reason:
            log.warning("%s: discarded a connection (%s)", self.name, reason)
        _conn.close(slot.conn)
        if self.min_size and not keep_place:
            self._fill_later(state)

    def _hand_place(self, state: State) -> None:
        # Called under the lock after a place was freed.
        if state.waiters and state.reserved < self.max_size:
            state.reserved += 1
            state.checkouts += 1
            state.waiters.popleft().give(CONNECT)

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

    # -- upkeep ---------------------------------------------------------------

    def _fill_later(self, state: State) -> None:
        with state.lock:
            if state.filling or len(state.slots) >= self.min_size or self._closed:
                return
            state.filling = True
        threading.Thread(target=self._fill, args=(state,), name=f"{self.name}-fill", daemon=True).start()

    def _fill(self, state: State) -> None:
        """Open connections up to ``min_size`` in the background, one at a time."""
        try:
            while True:
                with state.lock:
                    if (self._closed or state.pid != _getpid() or state.reserved >= self.min_size
                            or state.backoff):
                        return
                    state.reserved += 1
                try:
                    slot = self._open(state)
                except PoolError:
                    with state.lock:
                        state.reserved -= 1
                        self._hand_place(state)
                    return
                with state.lock:
                    state.slots[id(slot.conn)] = slot
                    if state.waiters:
                        slot.out_since = _now()
                        state.checkouts += 1
                        state.waiters.popleft().give(slot)
                    else:
                        state.idle.insert(0, slot)
        finally:
            state.filling = False

    def _scan_leaks(self, state: State, now: float) -> None:
        state.next_leak_scan = now + min(1.0, self._leak_timeout / 2)
        with state.lock:
            late = [s for s in state.slots.values()
                    if s.out_since is not None and not s.leak_reported
                    and now - s.out_since > self._leak_timeout]
        for slot in late:
            if slot.out_since is not None:
                self._report_leak(state, slot, now - slot.out_since, returned=False)

    def _report_leak(self, state: State, slot: _Slot, held: float, *, returned: bool) -> None:
        slot.leak_reported = True
        state.leaks += 1
        where = f"; checked out at:\n{slot.stack}" if slot.stack else ""
        log.warning("%s: connection held for %.1f s by %s (leak_timeout=%g s)%s%s",
                    self.name, held, slot.label or "an unnamed caller", self._leak_timeout,
                    "" if returned else ", still not returned", where)

    # -- introspection and shutdown -------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters and gauges of this process (a child starts from zero)."""
        state = self._state
        if state.pid != _getpid():
            state = self._process_state()
        with state.lock:
            size, idle, waiting = len(state.slots), len(state.idle), len(state.waiters)
            counters = state.counters()
        return {"name": self.name, "pid": state.pid, "min_size": self.min_size, "max_size": self.max_size,
                "size": size, "idle": idle, "in_use": size - idle, "waiting": waiting,
                **counters, "closed": self._closed}

    def close(self) -> None:
        """Close the idle connections; in-use ones are closed when returned."""
        self._closed = True
        state = self._state
        if state.pid != _getpid():
            self._forget(state)
            return
        with state.lock:
            idle, state.idle = state.idle, []
            for slot in idle:
                state.slots.pop(id(slot.conn), None)
            state.reserved -= len(idle)
            while state.waiters:
                state.waiters.popleft().give(CLOSED)
        for slot in idle:
            _conn.close(slot.conn)
        log.info("%s: closed (pid %d)", self.name, state.pid)
