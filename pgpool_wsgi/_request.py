"""One request's claims on pooled connections and its status line (the body is in _body.py).

The flow of one request: check out (eager) -> call the app -> hand the body
to the server -> the server calls ``close()`` -> end the transaction as the
mode says -> give the connection back (the pool resets it) -> idle. A body
that needs no connection (a list, the server's file wrapper) is finished
before the middleware returns it.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import threading
from typing import TYPE_CHECKING, Any, Callable

import psycopg2

from ._conn import is_broken_error
from ._text import request_line
from .errors import PoolError
from .pool import ConnectionPool

if TYPE_CHECKING:
    from _typeshed import OptExcInfo
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

log = logging.getLogger("pgpool_wsgi")

CONN_KEY = "pgpool.conn"
HANDLE_KEY = "pgpool.handle"
COMMIT_FAILED_BODY = b"500 Internal Server Error: the transaction could not be committed\n"
COMMIT_FAILED_HEADERS = [("Content-Type", "text/plain; charset=utf-8"),
                         ("Content-Length", str(len(COMMIT_FAILED_BODY)))]

# The handles of the requests being served in this thread / greenlet, by pool,
# while their app runs and while the server iterates and closes their body: a
# sub-request (webob's Request.blank(...).get_response) builds a new environ,
# but it runs in the same context and reuses them. A context copied meanwhile
# (copy_context, an executor) keeps the mapping after the request: finished
# handles in it are ignored.
# The value is the innermost request's Flow; Flow.find() walks out through its parents.
ACTIVE: contextvars.ContextVar[Flow | None] = contextvars.ContextVar("pgpool_wsgi.active", default=None)


class RequestHandle:
    """A request's claim on a pooled connection: ``environ["pgpool.handle"]``.

    ``handle.conn`` is the connection (checked out on first use in lazy mode;
    safe to ask from several threads: they share one checkout).
    ``handle.release()`` ends the transaction as a successful request would
    and hands the connection back early; a later ``handle.conn`` checks out
    again, and that connection goes back when the request ends. Once the
    request has ended, ``handle.conn`` raises :class:`PoolError`.
    Named pools get a handle each: ``environ["pgpool.<name>"]``, always lazy.
    """

    __slots__ = ("_conn", "_conn_key", "_environ", "_finished", "_lock", "_mode", "_pool", "_subs", "pool_error",
                 "status")

    def __init__(self, pool: ConnectionPool, mode: str, environ: WSGIEnvironment,
                 conn_key: str | None = CONN_KEY) -> None:
        self._pool = pool
        self._mode = mode
        self._environ: WSGIEnvironment | None = environ
        self._conn_key = conn_key
        self._subs: list[WSGIEnvironment] | None = None  # sub-requests' environs given our connection
        self._conn: Any = None
        # Made here, inside the request, so it is gevent's lock under gevent.
        self._lock = threading.Lock()
        self._finished = False
        self.pool_error: PoolError | None = None  # the last checkout failure, for the 503
        self.status = 200

    def __str__(self) -> str:
        # The holder's name in the pool's leak warnings: made only when logged.
        environ = self._environ
        if environ is None:
            return "a finished request"
        return request_line(environ)  # escaped and capped: the client chose the method and path

    @property
    def pool(self) -> ConnectionPool:
        return self._pool

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def mode(self) -> str:
        return self._mode

    def lend(self, environ: WSGIEnvironment) -> Any:
        """Put our connection into a sub-request's environ; it is removed when the connection goes back."""
        conn = self.conn
        if self._conn_key is not None:
            environ[self._conn_key] = conn
            if self._subs is None:
                self._subs = []
            self._subs.append(environ)
        return conn

    @property
    def conn(self) -> Any:
        """The request's connection; checked out now if it has none."""
        conn = self._conn
        if conn is not None:
            return conn
        return self._checkout()

    def _checkout(self) -> Any:
        with self._lock:  # two threads asking at once share one checkout
            if self._finished:
                raise PoolError(f"request finished: {self._pool.name!r} connections go back when the response "
                                "is done; a handle cannot check out after that")
            conn = self._conn
            if conn is not None:
                return conn
            return self.take()

    def take(self) -> Any:
        """Check out now; unlocked: for a handle no other thread can see yet (the eager checkout)."""
        try:
            conn = self._pool.getconn(label=self)
        except PoolError as exc:
            self.pool_error = exc
            raise
        # This handle got its connection after all: its earlier failure no longer explains a 5xx.
        self.pool_error = None
        # The mode decides, whatever the pool's resting state; the pool's
        # reset puts its own state back when the connection returns.
        autocommit = self._mode == "autocommit"
        try:
            if conn.autocommit is not autocommit:
                conn.autocommit = autocommit
        except BaseException:
            self._pool.putconn(conn, discard=True)
            raise
        self._conn = conn
        return conn

    def release(self) -> None:
        """End the transaction as at a successful end of the request; give the connection back."""
        self._give_back(None, succeeded=True, finish=False)

    def finish(self, exc: BaseException | None, *, succeeded: bool) -> None:
        """The request is over: end the transaction as the mode says, return the connection."""
        try:
            self._give_back(exc, succeeded=succeeded, finish=True)
        finally:
            # environ holds us too: drop the reference so the request is freed by reference
            # counting, not left to the cyclic collector. Only now: the pool's leak warning
            # at putconn names the request from it.
            self._environ = self._subs = None

    def commit(self) -> None:
        """Commit now (commit mode, before the status line goes out); keep the connection."""
        conn = self._conn
        if conn is not None and not conn.closed:
            try:
                conn.commit()
            except psycopg2.Error:
                log.exception("%s: commit failed", str(self))
                raise

    def _give_back(self, exc: BaseException | None, *, succeeded: bool, finish: bool) -> None:
        # Commit (commit mode, success) and return the connection; at most once.
        lock = self._lock
        lock.acquire()  # nothing in between can raise
        conn = self._conn
        self._conn = None
        if finish:
            self._finished = True
        lock.release()
        if conn is None:
            return
        key = self._conn_key
        if key is not None:
            # Never left pointing at a connection another request may hold.
            environ = self._environ
            subs = self._subs
            if environ is not None and environ.get(key) is conn:
                del environ[key]
            if subs is not None:
                for sub in subs:
                    if sub.get(key) is conn:
                        del sub[key]
        if self._mode == "commit" and succeeded and exc is None and self.status < 400 and not conn.closed:
            try:
                conn.commit()
            except BaseException as err:
                log.exception("%s: commit failed", str(self))
                self._pool.putconn(conn, discard=is_broken_error(err))
                raise
        self._pool.putconn(conn, discard=exc is not None and is_broken_error(exc))


class Flow:
    """One request through the middleware: its handles, its status line, its body.

    The app gets :meth:`start_response`. In commit mode (``hold``) the status
    line waits until the transaction is committed, that is until the first
    non-empty chunk or the end of the body, so a failed commit can still
    become a 500 (PEP 3333 lets a middleware hold it that long).
    """

    __slots__ = ("_held", "_hold", "_server_file_wrapper", "_start", "_write", "failed", "file_body",
                 "handles", "out", "parent", "refusal", "refused", "sent", "status")

    def __init__(self, handles: list[RequestHandle], start_response: StartResponse, hold: bool) -> None:
        self.handles = handles  # the ones this request owns and finishes
        self.parent: Flow | None = None  # the request this one runs inside (a sub-request's outer request)
        self._start = start_response
        self._hold = hold
        self._held: tuple[str, list[tuple[str, str]], OptExcInfo | None] | None = None
        self._write: Callable[[bytes], object] | None = None
        self._server_file_wrapper: Any = None
        self.sent = False  # the server has our status line (it goes out with the first chunk)
        self.out = False  # a non-empty chunk went to the server: the status is final
        self.failed: OptExcInfo | None = None  # the commit failed before the status went out
        self.refused: PoolError | None = None  # the app answered 5xx after this pool error: we answer the 503
        self.refusal: OptExcInfo | None = None  # the exc_info the app gave with that 5xx
        self.file_body: object = None  # what the server's wsgi.file_wrapper made in this request
        self.status = 200

    def __str__(self) -> str:
        return str(self.handles[0]) if self.handles else "a nested request"

    def find(self, pool: ConnectionPool) -> RequestHandle | None:
        """The unfinished handle for ``pool`` of this request or of one it runs inside."""
        flow: Flow | None = self
        while flow is not None:
            for handle in flow.handles:
                if handle._pool is pool and not handle._finished:
                    return handle
            flow = flow.parent
        return None

    def pool_error(self) -> PoolError | None:
        for handle in self.handles:
            if handle.pool_error is not None:
                return handle.pool_error
        return None

    # -- the status line ---------------------------------------------------------

    def start_response(self, status: str, headers: list[tuple[str, str]],
                       exc_info: OptExcInfo | None = None) -> Callable[[bytes], object]:
        if status[0] == "5" and not self.out:
            error = self.pool_error()
            if error is not None and _from_pool(exc_info):
                # A framework turned our PoolError into its own 500: answer the 503 instead.
                self.refused = error
                self.refusal = exc_info
                return self.write
        if not self._hold:  # the status matters to commit mode only
            self.sent = True
            self._write = self._start(status, headers, exc_info)
            return self.write
        code = int(status[:3])
        self.status = code
        for handle in self.handles:
            handle.status = code
        if self._hold and not self.sent:
            self._held = (status, headers, exc_info)
        else:
            self.sent = True
            self._write = self._start(status, headers, exc_info)
        return self.write

    def write(self, data: bytes) -> None:
        """The app's write(): the first non-empty chunk commits (commit mode) and sends the status."""
        if self.failed is not None or self.refused is not None:
            return  # a 500/503 replaces the app's response
        if not self.out:
            if not data:
                return
            if not self.open():
                return
            self.out = True
        assert self._write is not None
        self._write(data)

    def open(self) -> bool:
        """Send the held status line, committing first in commit mode; False if the commit failed."""
        if self.sent:
            return True
        if self._hold and self.status < 400:  # only commit mode commits; manual mode never does
            try:
                for handle in self.handles:
                    handle.commit()
            except psycopg2.Error:
                self.failed = sys.exc_info()
                return False
        self.forward()
        return True

    def forward(self) -> None:
        """Give the server the app's (held) status line."""
        held, self._held = self._held, None
        if held is not None and not self.sent:
            self.sent = True
            self._write = self._start(*held)

    def commit_failed(self) -> list[bytes]:
        """Answer 500: the status line has not gone out."""
        self._held = None
        self.sent = True
        self._start("500 Internal Server Error", list(COMMIT_FAILED_HEADERS), self.failed)
        return [COMMIT_FAILED_BODY]

    # -- file bodies ---------------------------------------------------------------

    def watch_files(self, environ: WSGIEnvironment, wrapper: Any) -> None:
        """Record what the server's wsgi.file_wrapper function (uWSGI's) makes during the app's call."""
        self._server_file_wrapper = wrapper
        environ["wsgi.file_wrapper"] = self.file_wrapper

    def unwatch_files(self, environ: WSGIEnvironment) -> None:
        """Give the server its own wrapper back: gunicorn, for one, tests ``isinstance(result, it)``."""
        if environ.get("wsgi.file_wrapper") == self.file_wrapper:
            environ["wsgi.file_wrapper"] = self._server_file_wrapper

    def file_wrapper(self, filelike: Any, block_size: int = 8192) -> Any:
        wrapped = self._server_file_wrapper(filelike, block_size)
        self.file_body = wrapped
        return wrapped

    # -- the end -----------------------------------------------------------------

    def finish(self, exc: BaseException | None, *, succeeded: bool) -> None:
        handles = self.handles
        if len(handles) == 1:  # the common case, without the loop's bookkeeping
            handles[0].finish(exc, succeeded=succeeded)
            return
        # Every connection goes back even if one commit fails; the first failure is raised.
        failure: BaseException | None = None
        for handle in self.handles:
            try:
                handle.finish(exc, succeeded=succeeded and failure is None)
            except BaseException as err:  # noqa: BLE001 - the first one is raised below
                failure = failure or err
        if failure is not None:
            raise failure


def _from_pool(exc_info: OptExcInfo | None) -> bool:
    """Could this 5xx be about a pool error? Unknown (no exc_info) counts as yes."""
    if exc_info is None or exc_info[1] is None:
        return True
    exc: BaseException | None = exc_info[1]
    for _ in range(20):  # the exception, its cause and context: bounded, chains can be cycles
        if exc is None:
            return False
        if isinstance(exc, PoolError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
