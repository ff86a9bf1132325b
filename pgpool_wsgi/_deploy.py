"""What the process model tells us: uWSGI master or not, how many workers.

Read from the servers' own objects, never guessed: uWSGI's ``uwsgi`` module,
and gunicorn's arbiter or worker (each installs bound methods of itself as
signal handlers). Returns None when the server does not say.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any


def in_uwsgi_master() -> bool:
    """True in a uWSGI master process (it forks in C, without at-fork hooks).

    By pid: mules and spoolers have ``worker_id() == 0`` too, but pool normally.
    """
    uwsgi = sys.modules.get("uwsgi")
    if uwsgi is None:
        return False
    try:
        return int(uwsgi.masterpid()) == os.getpid()
    except (AttributeError, TypeError, ValueError):  # a stub module or a uWSGI without workers
        return False


def gunicorn_owner(module_prefix: str = "gunicorn.") -> Any:
    """gunicorn's arbiter or worker: each installs bound methods of itself as signal handlers."""
    if "gunicorn" not in sys.modules:
        return None
    try:
        handler = signal.getsignal(signal.SIGTERM)
    except (ValueError, OSError):
        return None
    owner = getattr(handler, "__self__", None)
    return owner if type(owner).__module__.startswith(module_prefix) else None


def worker_processes() -> tuple[str, int] | None:
    """(server name, number of worker processes) if the server tells us."""
    uwsgi = sys.modules.get("uwsgi")
    if uwsgi is not None and isinstance(getattr(uwsgi, "numproc", None), int):
        return "uWSGI", int(uwsgi.numproc)
    owner = gunicorn_owner()
    if owner is not None:
        workers = getattr(owner, "num_workers", None) or getattr(getattr(owner, "cfg", None), "workers", None)
        if isinstance(workers, int):
            return "gunicorn", workers
    return None


def is_first_process() -> bool:
    """Are we the first worker, or not under a known server (so a deployment-wide warning is said once)?"""
    uwsgi = sys.modules.get("uwsgi")
    if uwsgi is not None:
        try:
            return int(uwsgi.worker_id()) == 1
        except (AttributeError, TypeError, ValueError):
            return True
    owner = gunicorn_owner()
    age = getattr(owner, "age", None)
    return not isinstance(age, int) or age <= 1
