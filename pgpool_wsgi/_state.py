"""Per-process pool state: slots, idle stack, waiters, counters.

A :class:`State` belongs to exactly one process. Its lock is created when the
state is, in the process that uses it, so gevent's patching after fork is
honoured and a lock left held by a thread of the parent cannot block us.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

COUNTERS = ("checkouts", "timeouts", "connects", "connect_errors", "discarded", "fork_resets", "leaks")


class Slot:
    """One open connection and what the pool knows about it."""

    __slots__ = ("conn", "session", "expires", "last_used", "out_since", "label", "stack", "leak_reported")

    def __init__(self, conn: Any, session: Any, expires: float, now: float) -> None:
        self.conn = conn
        self.session = session
        self.expires = expires
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

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.lock = threading.Lock()
        self.slots: dict[int, Slot] = {}  # id(conn) -> slot
        self.idle: list[Slot] = []  # a stack: the most recently used on top
        self.waiters: collections.deque[Waiter] = collections.deque()
        self.reserved = 0  # slots plus connects under way; never above max_size
        self.probing = False  # a connect is testing a server that failed
        self.backoff = 0.0  # seconds to wait after the last failed connect
        self.retry_at = 0.0  # no new connect before this (time.monotonic)
        self.filling = False
        self.next_leak_scan = 0.0
        self.dropped: int | None = None  # inherited connections released (in a child)
        self.is_uwsgi_master = _in_uwsgi_master()
        self.started = time.monotonic()
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

    def counters(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNTERS}


class Unused(State):
    """The placeholder a pool starts with: no process has used it yet."""

    def __init__(self) -> None:  # no lock: nothing may be created at import time
        self.pid = 0
        self.slots = {}
        self.idle = []
        self.dropped = 0


def _in_uwsgi_master() -> bool:
    # uWSGI forks in C without Python's at-fork hooks; its module tells us
    # when we are in the master, which must not keep connections.
    import sys

    uwsgi = sys.modules.get("uwsgi")
    if uwsgi is None:
        return False
    try:
        return bool(uwsgi.masterpid()) and uwsgi.worker_id() == 0
    except Exception:  # noqa: BLE001 - a stub module or a uWSGI without workers
        return False
