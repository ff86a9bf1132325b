"""Pool upkeep done on the side of checkouts and returns: min_size, max_idle, leaks.

No background threads: they would die in forked children, need gevent care,
and could be inside a connect when a master forks. Instead the caller that
returns a connection does the (rare) work, after its own connection is back.
"""

from __future__ import annotations

import logging
import math
import os
import time
import traceback
from collections.abc import Callable
from typing import Any, Protocol

from . import _conn, _deploy
from ._state import Slot, State

log = logging.getLogger("pgpool_wsgi")

_SWEEP_EVERY = 1.0  # seconds between looks for connections idle beyond max_idle


class Settings(Protocol):
    """What upkeep reads of a pool (its public settings)."""

    name: str
    min_size: int
    max_size: int
    max_idle: float
    leak_timeout: float
    leak_debug: bool


def run(pool: Settings, state: State, now: float, open_slot: Callable[[State], Slot]) -> None:
    """Called after a return when ``state.next_upkeep`` has come."""
    if state.pid != os.getpid():
        return  # a stale state in a child forked without hooks: never touch its sockets
    state.next_upkeep = now + min(_SWEEP_EVERY, pool.max_idle / 2)
    if pool.max_idle < math.inf:
        sweep_idle(pool, state, now)
    if state.reserved < pool.min_size:
        top_up(pool, state, open_slot)


def top_up(pool: Settings, state: State, open_slot: Callable[[State], Slot]) -> None:
    """Open ONE connection towards ``min_size`` (a returning request pays for at most one).

    While below ``min_size`` the next return comes back here.
    """
    filling = False
    try:  # begun before the flag is set: whatever is raised after, the flag and the place are undone
        with state.lock:
            if state.filling or not state.accepting or state.backoff or state.reserved >= pool.min_size:
                return
            # reserve(checkout=False), inlined: no call (where a signal handler can
            # raise) between taking the place and setting both flags.
            state.reserved += 1
            state.connecting += 1
            state.filling = filling = True
        slot = open_slot(state)
    except BaseException as exc:
        if filling:
            with state.lock:
                state.connect_failed(checkout=False)
                state.filling = False
        if isinstance(exc, Exception):
            return  # logged by the connect; the next return retries
        raise
    with state.lock:
        state.filling = False
        kept = state.park_spare(slot)
        if state.reserved < pool.min_size:
            state.next_upkeep = 0.0
    if not kept:
        _conn.close(slot.conn)  # the pool was closed while we connected


# pg_settings, not two-argument current_setting(): that is missing before
# PostgreSQL 9.6 and on several compatible servers. Superusers are held to
# neither CONNECTION LIMIT (and may use superuser_reserved_connections, which
# we leave out all the same, as a margin for the DBA).
_CAPACITY_SQL = (
    "SELECT (SELECT sum(CASE WHEN name = 'max_connections' THEN 1 ELSE -1 END * setting::int)"
    " FROM pg_settings WHERE name IN"
    " ('max_connections', 'superuser_reserved_connections', 'reserved_connections')),"
    " (SELECT CASE WHEN rolsuper THEN -1 ELSE rolconnlimit END FROM pg_roles WHERE rolname = session_user),"
    " (SELECT CASE WHEN (SELECT rolsuper FROM pg_roles WHERE rolname = session_user) THEN -1"
    " ELSE datconnlimit END FROM pg_database WHERE datname = current_database()),"
    " session_user, current_database()"
)


def check_capacity(pool: Settings, conn: Any) -> None:
    """After a process's first connect: can the server take all our processes' connections?

    Warns once (from the first worker) when processes x max_size exceeds
    what the server accepts, or the role's or database's CONNECTION LIMIT.
    One round trip, once per process, on a plain cursor in autocommit; the
    connection is left exactly as it was, whatever happens.
    """
    deployment = _deploy.worker_processes()
    server, processes = deployment if deployment else ("this process", 1)
    wanted = processes * pool.max_size
    try:
        with _conn.outside_transaction(conn) as cur:
            cur.execute(_CAPACITY_SQL)
            available, role_limit, db_limit, role, dbname = cur.fetchone()
        limits = [(int(available), "the server", "max_connections minus reserved")]
    except Exception as exc:  # noqa: BLE001 - a check we cannot make is no reason to fail a request
        log.debug("%s: could not read max_connections: %s", pool.name, exc)
        return
    if role_limit is not None and role_limit >= 0:
        limits.append((role_limit, f"role {role}", "its CONNECTION LIMIT"))
    if db_limit is not None and db_limit >= 0:
        limits.append((db_limit, f"database {dbname}", "its CONNECTION LIMIT"))
    accepted, what, why = min(limits, key=lambda limit: limit[0])
    if wanted > accepted and _deploy.is_first_process():
        who = f"{processes} {server} workers x max_size {pool.max_size}" if deployment else f"max_size {pool.max_size}"
        log.warning("%s: this deployment may open %d connections (%s) but %s accepts %d "
                    "(%s); lower max_size or the worker count, or put "
                    "PgBouncer in front (then set check_capacity = false)", pool.name, wanted, who, what,
                    accepted, why)


def drop_dead_idle(pool: Settings, state: State) -> None:
    """Test every idle connection (no round trip) and discard the dead ones."""
    watcher = state.watcher
    if watcher is None:
        return
    ready = watcher.look(time.monotonic(), force=True)
    now = time.monotonic()
    with state.lock:
        # The suspects leave idle while we examine them, marked out: a racing
        # checkout can neither take one we poll nor be handed one we close.
        suspects = [s for s in state.idle if s.fd in ready]
        for slot in suspects:
            state.idle.remove(slot)
            slot.out_since = now
    dead: list[Slot] = []
    try:
        dead.extend(s for s in suspects if not _conn.examine(s.conn))
    finally:  # interrupted or not, each suspect goes back: idle (or to a waiter), or out
        with state.lock:
            gone = [s for s in dead if state.slots.get(s.conn) is s]
            for slot in gone:
                state.forget(slot)
            state.discarded += len(gone)
            closed = [s for s in suspects if s not in dead and not state.park(s, now)]
        _conn.close_all(slot.conn for slot in closed)
    if gone:
        log.warning("%s: discarded %d more idle connection(s) closed by the server", pool.name, len(gone))
    _conn.close_all(slot.conn for slot in gone)


def sweep_idle(pool: Settings, state: State, now: float) -> None:
    """Close connections idle longer than ``max_idle``, keeping ``min_size`` open."""
    with state.lock:
        stale = 0
        for slot in state.idle:  # least recently used first
            if now - slot.last_used < pool.max_idle or len(state.slots) - stale <= pool.min_size:
                break
            stale += 1
        taken = state.take_idle(state.idle[:stale])
        state.discarded += len(taken)
    for slot in taken:
        log.info("%s: closed a connection idle for %.0f s (max_idle)", pool.name, now - slot.last_used)
    _conn.close_all(slot.conn for slot in taken)


def on_checkout(pool: Settings, state: State, slot: Slot, now: float) -> None:
    """Called after a checkout when ``state.next_leak_scan`` has come (always, with leak_debug)."""
    if pool.leak_debug:
        slot.stack = "".join(traceback.format_stack(limit=14)[:-2])
    if now >= state.leak_scan_due:
        scan_leaks(pool, state, now)


def scan_leaks(pool: Settings, state: State, now: float) -> None:
    """Warn once about each connection held longer than ``leak_timeout``."""
    state.leak_scan_due = now + min(1.0, pool.leak_timeout / 2)  # inf: never again
    state.next_leak_scan = -math.inf if pool.leak_debug else state.leak_scan_due
    with state.lock:
        late = [s for s in state.slots.values()
                if s.out_since is not None and not s.leak_reported and now - s.out_since > pool.leak_timeout]
    for slot in late:
        out_since = slot.out_since
        if out_since is not None:
            report_leak(pool, state, slot, now - out_since, returned=False)


def report_leak(pool: Settings, state: State, slot: Slot, held: float, *, returned: bool) -> None:
    slot.leak_reported = True
    state.leaks += 1
    log_it, skipped = state.leak_log.allow(time.monotonic())
    if not log_it:
        return
    where = f"; checked out at:\n{slot.stack}" if slot.stack else ""
    holder = "an unnamed caller" if slot.label is None else str(slot.label)  # now: the label may change
    more = f" ({skipped} more leak warning(s) not logged)" if skipped else ""
    log.warning("%s: connection held for %.1f s by %s (leak_timeout=%g s)%s%s%s",
                pool.name, held, holder, pool.leak_timeout,
                " and returned" if returned else ", not returned yet", more, where)
