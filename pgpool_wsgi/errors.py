"""The exceptions pgpool_wsgi raises.

Pool errors subclass :class:`psycopg2.OperationalError`, so code that already
handles "database unavailable" catches them too.
"""

from __future__ import annotations

try:
    import psycopg2
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "pgpool_wsgi needs psycopg2: install 'pgpool_wsgi[binary]' (the psycopg2-binary "
        "wheel) or 'pgpool_wsgi[source]' (psycopg2 built against your libpq)"
    ) from exc

__all__ = ["ConfigError", "PoolClosed", "PoolError", "PoolTimeout"]


class PoolError(psycopg2.OperationalError):
    """The pool cannot hand out a connection."""

    __module__ = "pgpool_wsgi"


class PoolTimeout(PoolError):
    """No connection became free within the timeout."""

    __module__ = "pgpool_wsgi"


class PoolClosed(PoolError):
    """The pool has been closed."""

    __module__ = "pgpool_wsgi"


class ConfigError(ValueError):
    """An option has an unknown name or a value it cannot take."""

    __module__ = "pgpool_wsgi"
