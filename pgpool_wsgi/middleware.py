"""WSGI middleware: a pooled connection per request, returned when the response is done."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import psycopg2

from ._concurrency import EagerGuard
from ._paths import AddressList, PathRules, wsgi_path
from ._request import CONN_KEY, HANDLE_KEY, Body, Finisher, HandleGroup, RequestHandle
from ._text import for_log, request_line
from .config import POOL_OPTIONS, validate
from .errors import ConfigError, PoolError
from .pool import ConnectionPool

if TYPE_CHECKING:
    from _typeshed import OptExcInfo
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["CONN_KEY", "HANDLE_KEY", "PgPoolMiddleware", "RequestHandle"]

log = logging.getLogger("pgpool_wsgi")

_UNAVAILABLE_BODY = b"503 Service Unavailable: no database connection available, retry later\n"
_COMMIT_FAILED_BODY = b"500 Internal Server Error: the transaction could not be committed\n"


def _plain(start_response: StartResponse, status: str,
           headers: list[tuple[str, str]] | None = None) -> Iterable[bytes]:
    body = f"{status}\n".encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
                            ("Cache-Control", "no-store"), *(headers or [])])
    return [body]


class _Throttle:
    """At most ``burst`` log lines per ``window`` seconds; counts the rest.

    An outage turns every request into a 503: one line each would bury the
    log. Unlocked: under threads a count may be off by one, nothing worse.
    """

    __slots__ = ("_burst", "_skipped", "_used", "_window", "_window_end")

    def __init__(self, burst: int = 5, window: float = 10.0) -> None:
        self._burst = burst
        self._window = window
        self._window_end = 0.0
        self._used = 0
        self._skipped = 0

    def allow(self) -> tuple[bool, int]:
        """(log this one?, how many were skipped since the last logged one)."""
        now = time.monotonic()
        if now >= self._window_end:
            self._window_end = now + self._window
            self._used = 0
        if self._used >= self._burst:
            self._skipped += 1
            return False, 0
        self._used += 1
        skipped, self._skipped = self._skipped, 0
        return True, skipped


def _autocommit_first(configure: Callable[[Any], Any] | None) -> Callable[[Any], Any]:
    # For pools the middleware builds in autocommit mode: autocommit becomes the
    # connections' resting state, so no request has to switch it on and off.
    def setup(conn: Any) -> None:
        conn.autocommit = True
        if configure is not None:
            configure(conn)

    return setup


def _build_pool(options: dict[str, Any], transaction: str) -> ConnectionPool:
    if transaction == "autocommit":
        options = {**options, "configure": _autocommit_first(options.get("configure"))}
    return ConnectionPool(**options)


def _named_pools(spec: Mapping[str, Any] | None, transaction: str) -> dict[str, ConnectionPool]:
    pools: dict[str, ConnectionPool] = {}
    for name, value in (spec or {}).items():
        if isinstance(value, ConnectionPool):
            pools[name] = value
            continue
        try:
            pools[name] = _build_pool({"name": name, **value}, transaction)
        except ConfigError as exc:
            raise ConfigError(f"{name}.{exc}") from None
    return pools


class PgPoolMiddleware:
    """WSGI middleware giving each request a pooled psycopg2 connection.

    :param app: the WSGI application to wrap.
    :param pool: a :class:`ConnectionPool` to use; or give pool options
        (``dsn``, ``max_size``, ...) and one is built.
    :param transaction: ``manual`` (default), ``commit`` or ``autocommit``.
    :param checkout: ``eager`` (default) or ``lazy``.
    :param exclude_paths: paths that never check out: whole segments
        (``/cpu`` is ``/cpu`` and ``/cpu/...``), or a prefix with a trailing ``*``.
    :param stats_path: serve ``pool.stats()`` as JSON at this path (GET, HEAD).
    :param stats_allow: client addresses/networks allowed to read ``stats_path``.
    :param retry_after: seconds in the 503's ``Retry-After`` header.
    :param pools: more pools by name (``{"replica": {"dsn": ...}}`` or
        ``{"replica": ConnectionPool(...)}``); each request gets a lazy handle
        for each at ``environ["pgpool.<name>"]``.

    ::

        app = PgPoolMiddleware(app, dsn="postgresql://app@db/app", max_size=10)

        def view(environ, start_response):
            with environ["pgpool.conn"].cursor() as cur:
                cur.execute("SELECT 1")
    """

    def __init__(self, app: WSGIApplication, pool: ConnectionPool | None = None, **options: Any) -> None:
        own = validate(options)  # every name and value, before anything is built
        pool_options = {k: v for k, v in options.items() if k in POOL_OPTIONS}
        if pool is not None and pool_options:
            raise ConfigError(f"{sorted(pool_options)[0]}: a pool option cannot be combined with pool=; "
                              "give it to the ConnectionPool instead")
        if pool is not None and not isinstance(pool, ConnectionPool):
            raise ConfigError(f"pool: got {type(pool).__name__}, expected a ConnectionPool")
        named = _named_pools(own["pools"], own["transaction"])
        self.app = app
        self.pool = pool if pool is not None else _build_pool(pool_options, own["transaction"])
        self.pools: dict[str, ConnectionPool] = named
        self.transaction: str = own["transaction"]
        self.checkout: str = own["checkout"]
        self.exclude_paths: tuple[str, ...] = own["exclude_paths"]
        self.stats_path: str | None = own["stats_path"]
        # Compared with PATH_INFO, which WSGI gives as the request's bytes decoded as latin-1.
        self._stats_path = None if self.stats_path is None else wsgi_path(self.stats_path)
        self._excluded = PathRules(self.exclude_paths) if self.exclude_paths else None
        self._stats_allow = None if own["stats_allow"] is None else AddressList(own["stats_allow"])
        self.retry_after: int = own["retry_after"]
        self._eager = self.checkout == "eager"
        self._before_checkout = EagerGuard(self.pool.name, self.pool.max_size)
        self._named_keys = [(f"pgpool.{name}", p) for name, p in named.items()]
        self._throttle = _Throttle()

    def __repr__(self) -> str:
        return f"<PgPoolMiddleware {self.transaction}/{self.checkout} {self.pool!r}>"

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == self._stats_path:
            return self._serve_stats(environ, start_response)
        if self._excluded is not None and self._excluded(path):
            return self.app(environ, start_response)
        handle = RequestHandle(self.pool, self.transaction, environ)
        environ[HANDLE_KEY] = handle
        finisher: Finisher = handle
        if self._named_keys:
            finisher = self._add_named(environ, handle)
        if self._eager:
            self._before_checkout(environ)  # a slow upload waits here, holding no connection
            try:
                environ[CONN_KEY] = handle._checkout()
            except PoolError as exc:
                return self._unavailable(environ, start_response, exc, None)
        if self.transaction == "commit":
            start_response = self._status_recorder(finisher, start_response)
        try:
            result = self.app(environ, start_response)
        except PoolError as exc:
            finisher.finish(exc, succeeded=False)
            return self._unavailable(environ, start_response, exc, sys.exc_info())
        except BaseException as exc:
            finisher.finish(exc, succeeded=False)
            raise
        if type(result) is list or type(result) is tuple:
            # The body exists already: finish now, before the status line goes out.
            return self._finish_now(result, finisher, start_response)
        return self._wrap(result, finisher, environ)

    def _add_named(self, environ: WSGIEnvironment, handle: RequestHandle) -> HandleGroup:
        handles = [handle]
        for key, pool in self._named_keys:
            named = RequestHandle(pool, self.transaction, environ, conn_key=None)
            environ[key] = named
            handles.append(named)
        return HandleGroup(handles, self.transaction)

    @staticmethod
    def _status_recorder(handle: Finisher, start_response: StartResponse) -> StartResponse:
        def recording(status: str, headers: list[tuple[str, str]], exc_info: OptExcInfo | None = None) -> Any:
            handle.status = int(status[:3])
            return start_response(status, headers, exc_info)

        return recording

    def _finish_now(self, result: Iterable[bytes], handle: Finisher,
                    start_response: StartResponse) -> Iterable[bytes]:
        try:
            handle.finish(None, succeeded=True)
        except psycopg2.Error:  # logged by the handle; the status line has not gone out: a 500
            start_response("500 Internal Server Error",
                           [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(_COMMIT_FAILED_BODY)))], sys.exc_info())
            return [_COMMIT_FAILED_BODY]
        return result

    @staticmethod
    def _wrap(result: Iterable[bytes], handle: Finisher, environ: WSGIEnvironment) -> Iterable[bytes]:
        file_wrapper = environ.get("wsgi.file_wrapper")
        if handle._mode != "commit" and isinstance(file_wrapper, type) and isinstance(result, file_wrapper):
            # Keep the server's own type so it can still use sendfile().
            inner: Callable[[], object] | None = getattr(result, "close", None)

            def close() -> None:
                try:
                    if inner is not None:
                        inner()
                finally:
                    handle.finish(None, succeeded=True)

            try:
                result.close = close  # type: ignore[attr-defined]
            except AttributeError:
                pass
            else:
                return result
        return Body(result, handle)

    def _unavailable(self, environ: WSGIEnvironment, start_response: StartResponse, exc: PoolError,
                     exc_info: OptExcInfo | None) -> Iterable[bytes]:
        allowed, skipped = self._throttle.allow()
        if allowed:
            more = f" ({skipped} more 503s not logged)" if skipped else ""
            # One line: the request is escaped and capped, libpq's multi-line message joined.
            log.warning("%s: 503, %s%s", request_line(environ), for_log(" ".join(str(exc).split()), 400), more)
        start_response("503 Service Unavailable",
                       [("Content-Type", "text/plain; charset=utf-8"),
                        ("Content-Length", str(len(_UNAVAILABLE_BODY))),
                        ("Retry-After", str(self.retry_after))], exc_info)
        return [_UNAVAILABLE_BODY]

    def _serve_stats(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        # Answered before the app (and its authentication) runs: read-only, and only to listed clients.
        if self._stats_allow is not None and not self._stats_allow.allows(environ.get("REMOTE_ADDR")):
            return _plain(start_response, "403 Forbidden")
        method = environ.get("REQUEST_METHOD")
        if method not in ("GET", "HEAD"):
            return _plain(start_response, "405 Method Not Allowed", [("Allow", "GET, HEAD")])
        stats = self.pool.stats()
        if self.pools:
            stats["pools"] = {name: pool.stats() for name, pool in self.pools.items()}
        body = json.dumps(stats, sort_keys=True).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                                  ("Cache-Control", "no-store")])
        return [b""] if method == "HEAD" else [body]

    def close(self) -> None:
        """Close this middleware's pools (idle connections now, busy ones when returned)."""
        self.pool.close()
        for pool in self.pools.values():
            pool.close()
