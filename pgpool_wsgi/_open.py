"""Opening a connection for a pool: backoff, connect, capacity check, configure.

A failed ``configure`` is a failed connect: counted, backed off, logged
(throttled) and raised as :class:`PoolError`, so the middleware answers 503.
All network I/O here runs without the pool lock.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any, NoReturn

import psycopg2

from . import _conn, _upkeep
from ._dsn import Target
from ._state import Slot, State
from .errors import PoolError

log = logging.getLogger("pgpool_wsgi")

_BACKOFF_FIRST = 0.1  # seconds after the first failed connect
_BACKOFF_MAX = 1.0  # recovery within about a second of the server coming back
_LIFETIME_JITTER = 0.1

_now = time.monotonic


class Opener:
    """Opens connections for one pool (any process): ``open(state)`` returns a new slot."""

    def __init__(self, pool: _upkeep.Settings, target: Target, *, configure: Callable[[Any], object] | None,
                 check_capacity: bool, max_lifetime: float, idle_limit: float, plain_reset: bool) -> None:
        self.pool = pool
        self.target = target
        self.configure = configure
        self.check_capacity = check_capacity
        self.max_lifetime = max_lifetime
        self.idle_limit = idle_limit  # the earliest of max_idle and (check = ping) ping_after
        self.plain_reset = plain_reset

    def open(self, state: State) -> Slot:
        """Connect and configure (I/O, no lock); a failure of either backs off the next ones."""
        now = _now()
        probe = False
        try:  # begun before the probing flag is set: the finally clears it whatever is raised
            with state.lock:
                # After a failed connect, one caller probes; the rest fail fast.
                refused = bool(state.backoff) and (now < state.retry_at or state.probing)
                if refused:
                    state.unreachable += 1
                else:
                    probe = state.probing = bool(state.backoff)  # both stores, no call between
            if refused:
                wait = max(state.retry_at - now, 0.0)
                raise PoolError(f"{self.pool.name}: cannot reach {self.target.describe()} "
                                f"(last connect failed; next attempt in {wait:.1f} s)")
            conn = self._connect_and_prepare(state)
        finally:
            if probe:  # a connect begun before the backoff must not end someone else's probe
                state.probing = False
        with state.lock:
            state.connects += 1  # only now: configure succeeded too
            state.backoff = 0.0
        now = _now()
        expires = now + self.max_lifetime * (1 - random.random() * _LIFETIME_JITTER)
        slot = Slot(conn, _conn.Session(conn), expires, min(expires, now + self.idle_limit), now)
        slot.plain = self.plain_reset and not slot.session.primary_only
        return slot

    def _connect_and_prepare(self, state: State) -> Any:
        try:
            conn = self.target.connect(state.pid)
        except psycopg2.Error as exc:
            self._failed(state, "cannot connect to", str(exc).strip())
        try:
            self._prepare(state, conn)
        except Exception as exc:  # noqa: BLE001 - any configure failure is a failed connect
            _conn.close(conn)
            self._failed(state, "configure failed on a new connection to",
                         f"{type(exc).__name__}: {str(exc).strip()}")
        except BaseException:
            _conn.close(conn)
            raise
        return conn

    def _prepare(self, state: State, conn: Any) -> None:
        with state.lock:
            first = not state.capacity_checked
            state.capacity_checked = True
        if first and self.check_capacity and state.accepting:  # not from a uWSGI master: its workers will
            _upkeep.check_capacity(self.pool, conn)
        if self.configure is not None:
            self.configure(conn)
            if conn.get_transaction_status() != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
                conn.commit()

    def _failed(self, state: State, what: str, detail: str) -> NoReturn:
        """Count a failed connect (or configure), back off, warn (throttled), raise PoolError."""
        with state.lock:
            state.connect_errors += 1
            state.backoff = min(max(state.backoff * 2, _BACKOFF_FIRST), _BACKOFF_MAX)
            state.retry_at = _now() + state.backoff
        reason = self.target.scrub(detail)
        where = f"{what} {self.target.describe()}"
        log_it, skipped = state.connect_log.allow(_now())
        if log_it:
            more = f" ({skipped} more failure(s) not logged)" if skipped else ""
            log.warning("%s: %s: %s%s", self.pool.name, where, reason, more)
        raise PoolError(f"{self.pool.name}: {where}: {reason}") from None

