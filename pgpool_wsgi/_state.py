"""Per-process pool state: slots, idle stack, waiters, counters.

A :class:`State` belongs to exactly one process. Its lock is created when the
state is, in the process that uses it, so gevent's patching after fork is
honoured and a lock left held by a thread of the parent cannot block us.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

from ._conn import Watcher
from ._deploy import in_uwsgi_master

COUNTERS = ("checkouts", "timeouts", "connects", "connect_errors", "discarded", "fork_resets", "leaks")


class Slot:
    """One open connection and what the pool knows about it."""

    __slots__ = ("conn", "expires", "fd", "good_until", "label", "last_used", "leak_reported", "out_since",
                 "session", "stack")

    def __init__(self, conn: Any, session: Any, expires: float, good_until: float, now: float) -> None:
        self.conn = conn
        self.fd: int = conn.fileno()
        self.session = session
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
        return self._lock.acquire(timeout=max(timeout, 0.0))

    def take(self) -> object:
        """After a timeout that lost the race to a giver: take what was given."""
        self._lock.acquire()
        return self.result


# What a waiter can be given besides a slot.
CONNECT = "connect"  # a free place: open a connection yourself
CLOSED = "closed"  # the pool was closed while you waited


class State:
    """Everything one process knows about its connections."""

    def __init__(self, pid: int, *, watch: bool = True) -> None:
        self.pid = pid
        self.lock = threading.Lock()
        self.watcher = Watcher() if watch else None  # None with check = none
        self.slots: dict[Any, Slot] = {}  # conn -> slot (connections hash by identity)
        self.idle: list[Slot] = []  # a stack: the most recently used on top
        self.waiters: collections.deque[Waiter] = collections.deque()
        self.reserved = 0  # slots plus connects under way; never above max_size
        self.probing = False  # a connect is testing a server that failed
        self.backoff = 0.0  # seconds to wait after the last failed connect
        self.retry_at = 0.0  # no new connect before this (time.monotonic)
        self.filling = False
        self.capacity_checked = False
        self.next_leak_scan = 0.0  # checkouts call _upkeep.on_checkout from then on
        self.leak_scan_due = 0.0
        self.next_upkeep = 0.0  # max_idle sweep, min_size top-up
        self.dropped: int | None = None  # inherited connections released (in a child)
        # False once the pool is closed, and in a uWSGI master (which must
        # not keep connections): returned connections are then closed.
        self.accepting = not in_uwsgi_master()
        for name in COUNTERS:
            setattr(self, name, 0)

    # Counters are plain attributes so the hot path pays no dict lookups.
    checkouts: int
    timeouts: int
    connects: int
    connect_errors: int
    discarded: int
    fork_resets: int
    leaks: int

    # Called under the lock: a connection joins or leaves this process's pool.

    def add(self, slot: Slot) -> None:
        self.slots[slot.conn] = slot
        if self.watcher is not None:
            self.watcher.add(slot.fd)

    def remove(self, slot: Slot) -> None:
        if self.slots.pop(slot.conn, None) is not None and self.watcher is not None:
            self.watcher.remove(slot.fd)

    def counters(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNTERS}


class Unused(State):
    """The placeholder a pool starts with: no process has used it yet."""

    def __init__(self) -> None:  # no lock: nothing may be created at import time
        self.pid = 0
        self.watcher = None
        self.slots = {}
        self.idle = []
        self.dropped = 0
        self.accepting = False
