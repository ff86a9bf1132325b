"""Fork handling: each process gets its own pool state; inherited sockets are released.

The mechanism is the fork mark checked on checkout and return (see
_forkmark.py and pool.py; the pid where the kernel refuses the mark): uWSGI
forks in C and never runs Python's at-fork hooks. The hooks below are
an accelerator where they do run (gunicorn, multiprocessing): the parent
closes its idle connections before the fork, and the child releases the
inherited sockets at once.

In a child nothing here calls into psycopg2 or takes the parent's lock:
both may have been held by a thread that does not exist here.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any

from . import _conn
from ._state import State, Unused

log = logging.getLogger("pgpool_wsgi")


class Home:
    """A pool's states by process, and the connections it lent out before a fork.

    The pool subclasses it; the hot paths read ``_state`` directly.
    """

    name: str

    def __init__(self) -> None:
        self._state: State = Unused()
        self._states: dict[int, State] = {}
        # id(conn) -> (conn, fd, what fd refers to): connections checked out
        # when we forked, which the application may still give back here.
        self._inherited: dict[int, tuple[Any, int, tuple[int, int] | None]] = {}
        _pools.add(self)

    def _new_state(self, pid: int) -> State:
        raise NotImplementedError

    def _process_state(self) -> State:
        """This process's state, made on first use here (after a fork: reset)."""
        pid = os.getpid()
        state = self._states.get(pid)
        if state is not None:
            return state
        fresh = self._new_state(pid)
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
        return state

    def _forget(self, old: State) -> int:
        """Release the descriptors of another process's connections; no I/O, no lock."""
        if old.dropped is not None:
            return old.dropped
        slots = list(old.slots.values())
        old.dropped = len(slots)
        old.slots, old.idle = {}, []  # a stale fast-path return finds nothing now
        failure: BaseException | None = None
        for slot in slots:  # one failure must not keep the rest open
            held = slot.out_since is not None
            try:
                now_refers = _conn.drop_inherited(slot.fd, slot.file_id, held=held)
                if held:
                    self._inherited[id(slot.conn)] = (slot.conn, slot.fd, now_refers)
            except BaseException as exc:  # noqa: BLE001 - re-raised once all are released
                failure = failure or exc
        if failure is not None:
            raise failure
        return old.dropped

    def _drop_lent(self, conn: Any) -> bool:
        """A connection checked out before the fork comes back here: release its number."""
        entry = self._inherited.pop(id(conn), None)
        if entry is None or entry[0] is not conn:
            return False
        if entry[2] is not None:  # the number still refers to our placeholder
            _conn.drop_inherited(entry[1], entry[2], held=False)
        return True


_pools: weakref.WeakSet[Home] = weakref.WeakSet()


def _before() -> None:
    # In the parent, before os.fork(): close our idle connections so a
    # pre-forking master (gunicorn --preload) keeps none. Never wait for a
    # pool lock here: its holder may be the thread that is forking.
    for home in list(_pools):
        state = home._state
        if state.pid != os.getpid() or not state.lock.acquire(blocking=False):
            continue
        try:
            idle = state.take_idle(list(state.idle))
        finally:
            state.lock.release()
        _conn.close_all(slot.conn for slot in idle)


def _after_in_child() -> None:
    # Release inherited sockets right away. Makes no lock (gevent may patch
    # threading later), takes none, and calls nothing in psycopg2.
    for home in list(_pools):
        state = home._state
        if state.pid and state.pid != os.getpid():
            try:
                home._forget(state)
            except Exception:  # never fail a fork; nothing is retried
                log.debug("%s: releasing inherited connections failed", home.name, exc_info=True)


os.register_at_fork(before=_before, after_in_child=_after_in_child)
