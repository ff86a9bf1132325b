"""Per-process pool state and every change made to it under its lock.

A :class:`State` belongs to exactly one process. Its lock is created when the
state is, in the process that uses it, so gevent's patching after fork is
honoured and a lock left held by a thread of the parent cannot block us.

As in CPython's ``queue.Queue``, each transition is a small method named for
what it does, run with ``state.lock`` held by the caller; none does I/O.
The invariants they keep (``check_invariants`` asserts them):

- ``reserved == len(slots) + connecting <= max_size``
- ``idle`` is a subset of ``slots`` with no duplicates; an idle slot is not out,
  and a slot that is not idle is out (``out_since`` set in the same hold that
  takes it from idle or registers it: an interrupt never leaves one neither)
- a waiter is in line xor given something; nobody waits while a slot is idle
- a closed state has no idle slot and no waiter
"""

from __future__ import annotations

import collections
import threading
from typing import Any

from . import _forkmark
from ._conn import Watcher, file_id
from ._deploy import in_uwsgi_master
from ._throttle import Throttle

COUNTERS = ("checkouts", "timeouts", "shed", "unreachable", "connects", "connect_errors", "discarded",
            "fork_resets", "leaks")


class Slot:
    """One open connection and what the pool knows about it."""

    __slots__ = ("conn", "expires", "fd", "file_id", "good_until", "label", "last_used",
                 "leak_reported", "out_since", "plain", "session", "stack")

    def __init__(self, conn: Any, session: Any, expires: float, good_until: float, now: float) -> None:
        self.conn = conn
        self.fd: int = conn.fileno()  # kept: a child releases it without asking psycopg2
        self.file_id = file_id(self.fd)  # ...and only if the number still refers to this socket
        self.session = session
        # Its returns may take the fast path (no reset_sql, no primary-only check).
        self.plain = False
        self.expires = expires  # max_lifetime, jittered
        # The earliest of expires, max_idle and (check = ping) ping_after
        # from the last use: one comparison at checkout covers all three.
        self.good_until = good_until
        self.last_used = now
        self.out_since: float | None = None
        self.label: object = None
        self.stack: str | None = None
        self.leak_reported = False


class Waiter:
    """A thread waiting in line for a connection (FIFO)."""

    __slots__ = ("_lock", "result")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self.result: object = None

    def give(self, result: object) -> None:
        """Hand over a slot, CONNECT or CLOSED; called under the pool lock."""
        self.result = result
        self._lock.release()

    def wait(self, timeout: float) -> bool:
        # A huge timeout would overflow the lock's clock: wait in bounded steps.
        return self._lock.acquire(timeout=min(max(timeout, 0.0), threading.TIMEOUT_MAX))


# What a checkout can get besides a slot.
CONNECT = "connect"  # a place: open a connection yourself
CLOSED = "closed"  # the pool is (or was, while you waited) closed
SHED = "shed"  # max_waiting checkouts are already waiting


class State:
    """Everything one process knows about its connections."""

    # Slots: the hot paths read a dozen of these per checkout; a plain
    # instance dict this large would lose CPython's fast attribute access.
    __slots__ = ("accepting", "backoff", "capacity_checked", "closed", "connect_log", "connecting", "dropped",
                 "filling", "idle", "leak_log", "leak_scan_due", "lock", "mark", "max_size", "min_size",
                 "next_leak_scan", "next_upkeep", "pid", "probing", "reserved", "retry_at", "slots", "waiters",
                 "watcher", *COUNTERS)

    def __init__(self, pid: int, *, max_size: int, min_size: int = 0, watch: bool = True,
                 closed: bool = False) -> None:
        self.pid = pid
        # mark[0] is true in this process only: the checkout's fork test
        # without a system call (see _forkmark). Made here, in the process
        # that owns the state.
        self.mark = _forkmark.current()
        self.max_size = max_size
        self.min_size = min_size
        # Reentrant: the hot paths release it after an interrupt only if this
        # thread holds it (_is_owned()), and a finaliser the cyclic GC runs
        # inside a hold may return a connection (see checkout). Our own code
        # never nests holds.
        self.lock = threading.RLock()
        self.watcher = Watcher() if watch else None  # None with check = none
        self.slots: dict[Any, Slot] = {}  # conn -> slot (connections hash by identity)
        self.idle: list[Slot] = []  # a stack: the most recently used on top
        self.waiters: collections.deque[Waiter] = collections.deque()
        self.reserved = 0  # slots plus connects under way; never above max_size
        self.connecting = 0  # places held by callers that are opening a connection
        self.probing = False  # a connect is testing a server that failed
        self.backoff = 0.0  # seconds to wait after the last failed connect
        self.retry_at = 0.0  # no new connect before this (time.monotonic)
        self.filling = False
        self.capacity_checked = False
        self.next_leak_scan = 0.0  # checkouts call _upkeep.on_checkout from then on
        self.leak_scan_due = 0.0
        self.next_upkeep = 0.0  # max_idle sweep, min_size top-up
        self.dropped: int | None = None  # inherited connections released (in a child)
        self.closed = closed
        self.leak_log = Throttle()  # leak warnings: at most 5 per 10 s per process
        self.connect_log = Throttle()  # connect (and configure) failure warnings
        # False once the pool is closed, and in a uWSGI master (which must
        # not keep connections): returned connections are then closed.
        self.accepting = not closed and not in_uwsgi_master()
        for name in COUNTERS:
            setattr(self, name, 0)

    # Counters are plain attributes so the hot path pays no dict lookups.
    checkouts: int
    timeouts: int
    shed: int
    unreachable: int
    connects: int
    connect_errors: int
    discarded: int
    fork_resets: int
    leaks: int

    # -- checkout: take idle, reserve a place, queue ----------------------------

    def checkout(self, max_waiting: int) -> Slot | Waiter | str:
        """An idle slot, a place (CONNECT), a place in line, SHED or CLOSED.

        One lock hold from the idle check to queueing: a return can never
        land between them and leave a waiter beside an idle connection.
        """
        if self.closed:
            return CLOSED
        # Allocated before idle is looked at: allocating may run the cyclic GC,
        # whose finaliser may return a connection here (the lock is reentrant).
        waiter = Waiter()
        if self.idle and self.accepting:
            self.checkouts += 1
            return self.idle.pop()
        if self.reserved < self.max_size:
            self.reserve(checkout=True)
            return CONNECT
        if max_waiting and len(self.waiters) >= max_waiting:
            self.timeouts += 1
            self.shed += 1
            return SHED
        self.waiters.append(waiter)  # in line, not given
        return waiter

    def reserve(self, *, checkout: bool) -> None:
        # reserved == len(slots) + connecting: the caller now opens a connection.
        self.reserved += 1
        self.connecting += 1
        if checkout:
            self.checkouts += 1

    def opened(self, slot: Slot) -> None:
        """A connect made in a reserved place succeeded: the place is the slot's now."""
        self.connecting -= 1
        self.slots[slot.conn] = slot
        if self.watcher is not None:
            self.watcher.add(slot.fd, slot)

    def connect_failed(self, *, checkout: bool) -> None:
        """A connect in a reserved place failed or was abandoned: free the place."""
        self.connecting -= 1
        if checkout:
            self.checkouts -= 1
        self.free_place()

    # -- waiters ----------------------------------------------------------------

    def leave_line(self, waiter: Waiter) -> object:
        """A waiter gives up: off the line (None), or what it was given meanwhile."""
        try:
            self.waiters.remove(waiter)
        except ValueError:
            return waiter.result  # given under this lock: in line xor given
        return None

    def hand_on(self, got: object, now: float) -> Slot | None:
        """A waiter that was given ``got`` cannot use it: pass it to the next one.

        Returns a slot the caller must close (the state was closed meanwhile).
        """
        if isinstance(got, Slot):
            self.checkouts -= 1
            return None if self.park(got, now) else got
        if got == CONNECT:
            self.connect_failed(checkout=True)
        return None

    def free_place(self) -> None:
        """A place was given back: the longest waiter may use it to connect."""
        self.reserved -= 1
        if self.waiters and self.reserved < self.max_size and not self.closed:
            self.reserve(checkout=True)
            self.waiters.popleft().give(CONNECT)

    # -- return: hand over, park idle ---------------------------------------------

    def park(self, slot: Slot, now: float) -> bool:
        """A reset connection comes back: to the longest waiter, else idle.

        False when the pool was closed meanwhile: the slot is forgotten and
        the caller closes it (outside the lock).
        """
        if not self.accepting:
            self.forget(slot)
            return False
        if self.waiters:
            slot.out_since = now
            self.checkouts += 1
            self.waiters.popleft().give(slot)
        else:
            slot.out_since = None
            self.idle.append(slot)
        return True

    def park_spare(self, slot: Slot) -> bool:
        """A connection opened for min_size: to a waiter, else at the bottom of idle."""
        self.opened(slot)
        if self.waiters or not self.accepting:
            return self.park(slot, slot.last_used)
        self.idle.insert(0, slot)  # used connections stay on top
        return True

    # -- forget, take idle, close -------------------------------------------------

    def forget(self, slot: Slot, *, keep_place: bool = False) -> None:
        """A connection leaves the pool (the caller closes it outside the lock).

        With ``keep_place`` the caller keeps its place to open a replacement.
        """
        if self.slots.pop(slot.conn, None) is None:
            return
        if slot in self.idle:
            self.idle.remove(slot)
        if self.watcher is not None:
            self.watcher.remove(slot.fd, slot)
        if keep_place:
            self.connecting += 1
        else:
            self.free_place()

    def take_idle(self, slots: list[Slot]) -> list[Slot]:
        """Take these slots out of idle and out of the pool; the caller closes them."""
        taken = [s for s in slots if s in self.idle]
        for slot in taken:
            self.forget(slot)
        return taken

    def close(self) -> list[Slot]:
        """No more checkouts; waiters learn it; the idle slots go to the caller to close."""
        self.closed = True
        self.accepting = False
        idle = self.take_idle(list(self.idle))
        while self.waiters:
            self.waiters.popleft().give(CLOSED)
        return idle

    def counters(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNTERS}

    def check_invariants(self) -> None:
        """Assert the invariants above (tests call it; takes the lock)."""
        with self.lock:
            idle_set = {id(s) for s in self.idle}
            problems = [
                (self.reserved == len(self.slots) + self.connecting, "reserved != slots + connecting"),
                (self.connecting >= 0 and self.reserved <= self.max_size, "reserved out of range"),
                (len(idle_set) == len(self.idle), "a slot twice in idle"),
                (all(self.slots.get(s.conn) is s and s.out_since is None for s in self.idle),
                 "an idle slot not in slots, or out"),
                (all(s.out_since is not None for s in self.slots.values() if id(s) not in idle_set),
                 "a slot neither idle nor out"),
                (not (self.idle and self.waiters), "a waiter beside an idle slot"),
                (not self.closed or not (self.idle or self.waiters), "a closed state keeps idle or waiters"),
            ]
            if self.watcher is not None:
                problems.append((self.watcher.watched() == {s.fd for s in self.slots.values()},
                                 "the watcher does not watch exactly the open connections"))
            state = (f"reserved={self.reserved} slots={len(self.slots)} connecting={self.connecting} "
                     f"idle={len(self.idle)} waiters={len(self.waiters)}")
        for ok, what in problems:
            if not ok:
                raise AssertionError(f"pool state broken: {what} ({state})")


class Unused(State):
    """The placeholder a pool starts with: no process has used it yet."""

    def __init__(self) -> None:  # no lock: nothing may be created at import time
        self.pid = 0
        self.mark = _forkmark.NOWHERE  # reads 0: the first checkout makes the real state
        self.watcher = None
        self.slots = {}
        self.idle = []
        self.dropped = 0
        self.accepting = False
        self.closed = False
