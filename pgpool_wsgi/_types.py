"""What the type checker knows: the options as TypedDicts (for ``**options: Unpack[...]``), and stats().

Only annotations: nothing here runs at request time. The keys must be the
option table's (pgpool_wsgi/config.py); tests/test_typing.py keeps them equal.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypedDict

if TYPE_CHECKING:
    from psycopg2.extensions import connection


class PoolKwargs(TypedDict, total=False):
    """The pool options after ``dsn`` (``ConnectionPool(dsn, **options)``)."""

    min_size: int
    max_size: int
    timeout: float
    max_waiting: int
    connect_timeout: int
    max_lifetime: float
    max_idle: float
    check: Literal["auto", "ping", "none"]
    ping_after: float
    reset_sql: str | None
    leak_timeout: float
    leak_debug: bool
    check_capacity: bool
    name: str
    connect_kwargs: Mapping[str, Any] | None
    configure: Callable[[connection], object] | None


class PoolOptions(PoolKwargs, total=False):
    """Every pool option, ``dsn`` included (a named pool's dict)."""

    dsn: str | None


class PoolStats(TypedDict):
    """``ConnectionPool.stats()``: this process's gauges and counters."""

    name: str
    pid: int
    min_size: int
    max_size: int
    size: int
    idle: int
    in_use: int
    waiting: int
    checkouts: int
    timeouts: int
    shed: int
    unreachable: int
    connects: int
    connect_errors: int
    discarded: int
    fork_resets: int
    leaks: int
    closed: bool
