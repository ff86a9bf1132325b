"""pgpool_wsgi: a fork-aware, thread-safe psycopg2 pool as WSGI middleware."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from ._request import RequestHandle
from .errors import ConfigError, PoolClosed, PoolError, PoolTimeout
from .middleware import PgPoolMiddleware
from .pool import ConnectionPool

try:
    __version__ = version("pgpool_wsgi")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = [
    "ConfigError",
    "ConnectionPool",
    "PgPoolMiddleware",
    "PoolClosed",
    "PoolError",
    "PoolTimeout",
    "RequestHandle",
    "__version__",
]
