"""WSGI middleware: a pooled connection per request, returned when the response is done."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal, cast

import psycopg2

from ._body import Body, SizedBody
from ._concurrency import EagerGuard
from ._paths import AddressList, PathRules, wsgi_path
from ._request import ACTIVE, CONN_KEY, HANDLE_KEY, Flow, RequestHandle
from ._text import for_log, request_line
from ._throttle import Throttle
from ._types import PoolOptions
from .config import POOL_OPTIONS, validate
from .errors import ConfigError, PoolError
from .pool import ConnectionPool

if TYPE_CHECKING:
    from _typeshed import OptExcInfo
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment
    from typing_extensions import Unpack


__all__ = ["CONN_KEY", "HANDLE_KEY", "PgPoolMiddleware", "RequestHandle"]

log = logging.getLogger("pgpool_wsgi")

_UNAVAILABLE_BODY = b"503 Service Unavailable: no database connection available, retry later\n"


def _plain(start_response: StartResponse, status: str,
           headers: list[tuple[str, str]] | None = None) -> Iterable[bytes]:
    body = f"{status}\n".encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
                            ("Cache-Control", "no-store"), *(headers or [])])
    return [body]


class MiddlewareKwargs(PoolOptions, total=False):
    """``PgPoolMiddleware(app, pool=None, **options)``: pool and middleware options."""

    transaction: Literal["manual", "commit", "autocommit"]
    checkout: Literal["eager", "lazy"]
    exclude_paths: Iterable[str]
    stats_path: str | None
    stats_allow: Iterable[str] | None
    retry_after: int
    pools: Mapping[str, ConnectionPool | PoolOptions] | None


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


def _close(result: Iterable[bytes]) -> None:
    close = getattr(result, "close", None)
    if close is not None:
        close()


def _exc_info(exc: BaseException) -> OptExcInfo:
    return cast("OptExcInfo", (type(exc), exc, exc.__traceback__))


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

    def __init__(self, app: WSGIApplication, pool: ConnectionPool | None = None,
                 **options: Unpack[MiddlewareKwargs]) -> None:
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
        self._hold = self.transaction == "commit"  # commit mode holds the status line until it has committed
        self._mode_warned = False
        self._before_checkout = EagerGuard(self.pool.name, self.pool.max_size)
        self._named_keys = [(f"pgpool.{name}", p) for name, p in named.items()]
        self._throttle = Throttle()  # the 503 warnings: at most 5 per 10 s per worker

    _refusals: list[Any] | None = None  # [pid, 503s answered, lock]: see refused()

    def __repr__(self) -> str:
        return f"<PgPoolMiddleware {self.transaction}/{self.checkout} {self.pool!r}>"

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == self._stats_path:
            return self._serve_stats(environ, start_response)
        if self._excluded is not None and self._excluded(path):
            return self.app(environ, start_response)
        active = ACTIVE.get()
        if active is not None:
            mine = active.find(self.pool)  # finished handles (in a context copied from a request) do not count
            if mine is not None:
                return self._nested(environ, start_response, active, mine)
        outer = environ.get(HANDLE_KEY)
        if outer is not None and isinstance(outer, RequestHandle) and outer.pool is self.pool and not outer.finished:
            return self._nested(environ, start_response, active, outer)
        handle = RequestHandle(self.pool, self.transaction, environ)
        environ[HANDLE_KEY] = handle
        flow = Flow([handle], start_response, self._hold)
        if self._named_keys:
            self._add_named(environ, flow.handles, None)
        if self._eager:
            if "CONTENT_LENGTH" in environ or self._before_checkout.pending:
                self._before_checkout(environ)  # a slow upload waits here, holding no connection
            try:
                environ[CONN_KEY] = handle.take()  # no lock: no other thread can see the handle yet
            except PoolError as exc:
                flow.finish(exc, succeeded=False)
                return self._refuse(environ, start_response, exc, None)
        return self._run(environ, flow, active)

    def _run(self, environ: WSGIEnvironment, flow: Flow, active: Flow | None) -> Iterable[bytes]:
        # A server's file_wrapper class is recognised by isinstance(); a function
        # (uWSGI's) is replaced for the app's call by one noting what it makes.
        file_wrapper = environ.get("wsgi.file_wrapper")
        watching = file_wrapper is not None and not isinstance(file_wrapper, type)
        if watching:
            flow.watch_files(environ, file_wrapper)
        flow.parent = active
        token = ACTIVE.set(flow)
        try:
            result = self.app(environ, flow.start_response)
        except PoolError as exc:
            flow.finish(exc, succeeded=False)
            if flow.out:  # part of the app's response went out with write(): no 503 can replace it
                log.warning("%s: response cut short, %s", request_line(environ), for_log(str(exc), 400))
                return []
            return self._refuse(environ, flow._start, exc, sys.exc_info())
        except BaseException as exc:
            flow.finish(exc, succeeded=False)
            raise
        finally:
            ACTIVE.reset(token)
            if watching:
                flow.unwatch_files(environ)
        if flow.refused is not None or flow.failed is not None:
            return self._replace(environ, result, flow)
        if (type(result) is list or type(result) is tuple
                or (result is flow.file_body if watching else file_wrapper is not None
                    and isinstance(result, file_wrapper))):
            # Nothing left that needs the database: finish before the status line goes out.
            # A file body goes back to the server untouched (sendfile, uWSGI's offload).
            try:
                flow.finish(None, succeeded=True)
            except psycopg2.Error:  # logged by the handle
                return self._commit_failed_now(result, flow)
            if self._hold:
                flow.forward()
            return result
        return self._wrap(result, flow, environ)

    def _nested(self, environ: WSGIEnvironment, start_response: StartResponse,
                active: Flow | None, handle: RequestHandle) -> Iterable[bytes]:
        # Inside a request that already holds a handle for our pool (nested
        # middleware, a sub-request): reuse the outer request's handles; the
        # outer request ends their transactions and returns their connections.
        if handle.mode != self.transaction and not self._mode_warned:
            self._mode_warned = True  # unlocked: two racing first nestings may both warn, nothing worse
            log.warning("%s: nested inside a %s-mode request for the same pool, this %s-mode middleware "
                        "uses the outer request's transaction; its own mode is ignored",
                        self.pool.name, handle.mode, self.transaction)
        environ[HANDLE_KEY] = handle
        if self._eager:
            try:
                handle.lend(environ)  # removed from this environ too when the connection goes back
            except PoolError as exc:
                return self._refuse(environ, start_response, exc, None)
        if not self._named_keys:
            return self.app(environ, start_response)
        # Named pools the outer request lacks get handles of their own, finished when this call ends.
        own: list[RequestHandle] = []
        self._add_named(environ, own, active)
        if not own:
            return self.app(environ, start_response)
        return self._run(environ, Flow(own, start_response, self._hold), active)

    def _add_named(self, environ: WSGIEnvironment, handles: list[RequestHandle],
                   active: Flow | None) -> None:
        for key, pool in self._named_keys:
            named = None if active is None else active.find(pool)
            if named is None:
                named = RequestHandle(pool, self.transaction, environ, conn_key=None)
                handles.append(named)
            environ[key] = named

    @staticmethod
    def _commit_failed_now(result: Iterable[bytes], flow: Flow) -> Iterable[bytes]:
        # Called in the except block of the failed commit: sys.exc_info() is its error.
        if flow.out:
            return result  # the status line went out with an earlier write(): too late for a 500
        flow.failed = sys.exc_info()
        _close(result)
        return flow.commit_failed()

    def _replace(self, environ: WSGIEnvironment, result: Iterable[bytes], flow: Flow) -> Iterable[bytes]:
        # The app's response is not sent: its commit failed (in write()) or it
        # answered 5xx after a pool error. Nothing of it has gone out.
        try:
            _close(result)
        finally:
            flow.finish(None, succeeded=False)
        if flow.failed is not None:
            return flow.commit_failed()
        error = flow.refused
        assert error is not None
        # exc_info: the server may have the app's earlier status line (not sent: no chunk went out).
        return self._refuse(environ, flow._start, error, flow.refusal or _exc_info(error))

    def _wrap(self, result: Iterable[bytes], flow: Flow, environ: WSGIEnvironment) -> Iterable[bytes]:
        if hasattr(type(result), "__len__"):
            return SizedBody(result, flow, environ, self._pool_error_in_body)
        return Body(result, flow, environ, self._pool_error_in_body)

    def _pool_error_in_body(self, environ: WSGIEnvironment, flow: Flow, exc: PoolError) -> Iterable[bytes]:
        if not flow.out:
            # No chunk has gone out: the 503 replaces the response.
            return self._refuse(environ, flow._start, exc, flow.refusal or _exc_info(exc))
        log.warning("%s: response cut short, %s", str(flow), exc)
        return []

    def _refuse(self, environ: WSGIEnvironment, start_response: StartResponse, exc: PoolError,
                exc_info: OptExcInfo | None) -> Iterable[bytes]:
        # Every 503 this middleware answers goes through here, so it is counted.
        pid = os.getpid()
        counter = self._refusals
        if counter is None or counter[0] != pid:  # the first 503 in this process (or the first after a fork)
            counter = self._refusals = [pid, 0, threading.Lock()]
        with counter[2]:
            counter[1] += 1
        return self._unavailable(environ, start_response, exc, exc_info)

    def refused(self) -> int:
        """How many 503s this middleware has answered in this process (a forked child starts at 0)."""
        counter = self._refusals
        return counter[1] if counter is not None and counter[0] == os.getpid() else 0

    def _unavailable(self, environ: WSGIEnvironment, start_response: StartResponse, exc: PoolError,
                     exc_info: OptExcInfo | None) -> Iterable[bytes]:
        allowed, skipped = self._throttle.allow(time.monotonic())
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
        stats: dict[str, Any] = dict(self.pool.stats())
        stats["refused"] = self.refused()
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
