"""Fork handling: each process gets its own pool state; inherited sockets are released.

The mechanism is the pid comparison on checkout and return (see pool.py):
uWSGI forks in C and never runs Python's at-fork hooks. The hooks below are
an accelerator where they do run (gunicorn, multiprocessing): the parent
closes its idle connections before the fork, and the child releases the
inherited sockets at once.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import TYPE_CHECKING

from . import _conn
from ._state import State

if TYPE_CHECKING:
    from .pool import ConnectionPool

log = logging.getLogger("pgpool_wsgi")

_pools: weakref.WeakSet[ConnectionPool] = weakref.WeakSet()


def register(pool: ConnectionPool) -> None:
    _pools.add(pool)


def process_state(pool: ConnectionPool) -> State:
    """This process's state of ``pool``, made on first use here (after a fork: reset)."""
    pid = os.getpid()
    state = pool._states.get(pid)
    if state is not None:
        return state
    fresh = State(pid, watch=pool.check != "none")
    fresh.accepting = fresh.accepting and not pool.closed
    # setdefault is atomic: threads racing here all get the same state.
    state = pool._states.setdefault(pid, fresh)
    if state is not fresh:
        return state
    old, pool._state = pool._state, state
    for other in [p for p in pool._states if p != pid]:
        pool._states.pop(other, None)
    if old.pid:
        dropped = forget(pool, old)
        state.fork_resets += 1
        log.info("%s: fork detected (pid %d -> %d): dropped %d inherited connection(s)",
                 pool.name, old.pid, pid, dropped)
    return state


def forget(pool: ConnectionPool, old: State) -> int:
    """Release the sockets of another process's connections; no I/O on them."""
    if old.dropped is None:
        old.dropped = len(old.slots)
        for conn in list(old.slots):
            _conn.drop_inherited(conn)
        # Connections checked out at fork time may still come back here.
        pool._inherited = {id(c): c for c, s in old.slots.items() if s.out_since is not None}
        old.idle = []
    return old.dropped


def _before() -> None:
    # In the parent, before os.fork(): close our idle connections so a
    # pre-forking master (gunicorn --preload) keeps none. Never wait for a
    # pool lock here: its holder may be the thread that is forking.
    for pool in list(_pools):
        state = pool._state
        if state.pid != os.getpid() or not state.lock.acquire(blocking=False):
            continue
        try:
            idle = pool._take_idle(state, state.idle)
        finally:
            state.lock.release()
        for slot in idle:
            _conn.close(slot.conn)


def _after_in_child() -> None:
    # Release inherited sockets right away. Makes no lock (gevent may patch
    # threading later) and takes none.
    for pool in list(_pools):
        state = pool._state
        if state.pid and state.pid != os.getpid():
            forget(pool, state)


os.register_at_fork(before=_before, after_in_child=_after_in_child)
