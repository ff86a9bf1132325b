"""Python's at-fork hooks for every pool: an accelerator, not the mechanism.

uWSGI forks in C and never runs these hooks; the pools compare
``os.getpid()`` on every checkout and return, which is what makes them
correct. The hooks only make things tidier where they run (gunicorn,
multiprocessing): the parent closes its idle connections before the fork and
the child releases the inherited sockets at once.
"""

from __future__ import annotations

import os
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .pool import ConnectionPool

_pools: weakref.WeakSet[ConnectionPool] = weakref.WeakSet()


def register(pool: ConnectionPool) -> None:
    _pools.add(pool)


def _before() -> None:
    for pool in list(_pools):
        pool._before_fork()


def _after_in_child() -> None:
    for pool in list(_pools):
        pool._after_fork_in_child()


os.register_at_fork(before=_before, after_in_child=_after_in_child)
