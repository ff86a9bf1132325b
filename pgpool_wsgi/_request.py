"""One request's claims on pooled connections, and the body that returns them.

The flow of one request: check out (eager) -> call the app -> hand the body
to the server -> the server calls ``close()`` -> end the transaction as the
mode says -> give the connection back (the pool resets it) -> idle.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Union

import psycopg2

from . import _conn
from ._text import request_line
from .pool import ConnectionPool

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment

log = logging.getLogger("pgpool_wsgi")

CONN_KEY = "pgpool.conn"
HANDLE_KEY = "pgpool.handle"


class RequestHandle:
    """A request's claim on a pooled connection: ``environ["pgpool.handle"]``.

    ``handle.conn`` is the connection (checked out on first use in lazy mode);
    ``handle.release()`` ends the transaction as a successful request would
    and hands the connection back early, e.g. before streaming a file.
    Named pools get a handle each: ``environ["pgpool.<name>"]``, always lazy.
    """

    __slots__ = ("_conn", "_conn_key", "_environ", "_mode", "_pool", "status")

    def __init__(self, pool: ConnectionPool, mode: str, environ: WSGIEnvironment,
                 conn_key: str | None = CONN_KEY) -> None:
        self._pool = pool
        self._mode = mode
        # environ holds us too: finish() drops this reference so the request
        # is freed by reference counting, not left to the cyclic collector.
        self._environ: WSGIEnvironment | None = environ
        self._conn_key = conn_key
        self._conn: Any = None
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
    def conn(self) -> Any:
        """The request's connection; checked out now if it has none."""
        if self._conn is None:
            self._checkout()
        return self._conn

    def _checkout(self) -> Any:
        conn = self._pool.getconn(label=self)
        if self._mode == "autocommit" and not conn.autocommit:
            conn.autocommit = True
        self._conn = conn
        return conn

    def release(self) -> None:
        """End the transaction as at a successful end of the request; give the connection back."""
        if self._conn_key is not None and self._environ is not None:
            self._environ.pop(self._conn_key, None)
        self._give_back(None, succeeded=True)

    def finish(self, exc: BaseException | None, *, succeeded: bool) -> None:
        """The request is over: end the transaction as the mode says, return the connection."""
        try:
            self._give_back(exc, succeeded=succeeded)
        finally:
            self._environ = None

    def _give_back(self, exc: BaseException | None, *, succeeded: bool) -> None:
        # Commit (commit mode, success) and return the connection; at most once.
        conn, self._conn = self._conn, None
        if conn is None:
            return
        discard = exc is not None and _conn.is_broken_error(exc)
        if self._mode == "commit" and succeeded and exc is None and self.status < 400 and not conn.closed:
            try:
                conn.commit()
            except BaseException as err:
                log.exception("%s: commit failed", str(self))
                self._pool.putconn(conn, discard=_conn.is_broken_error(err))
                raise
        self._pool.putconn(conn, discard=discard)


class HandleGroup:
    """The request's main handle plus one per named pool, finished together."""

    __slots__ = ("_mode", "handles")

    def __init__(self, handles: list[RequestHandle], mode: str) -> None:
        self.handles = handles
        self._mode = mode

    def __str__(self) -> str:
        return str(self.handles[0])

    @property
    def status(self) -> int:
        return self.handles[0].status

    @status.setter
    def status(self, value: int) -> None:
        for handle in self.handles:
            handle.status = value

    def finish(self, exc: BaseException | None, *, succeeded: bool) -> None:
        # Every connection goes back even if one commit fails; the first failure is raised.
        failure: BaseException | None = None
        for handle in self.handles:
            try:
                handle.finish(exc, succeeded=succeeded and failure is None)
            except BaseException as err:  # noqa: BLE001 - the first one is raised below
                failure = failure or err
        if failure is not None:
            raise failure


Finisher = Union[RequestHandle, HandleGroup]


class Body:
    """The app's body iterable, returning the connections when the server closes it."""

    __slots__ = ("_result", "_handle", "_done")

    def __init__(self, result: Iterable[bytes], handle: Finisher) -> None:
        self._result = result
        self._handle = handle
        self._done = False

    def __iter__(self) -> Iterator[bytes]:
        if self._handle._mode != "commit":
            return iter(self._result)
        return self._watch()

    def _watch(self) -> Iterator[bytes]:
        # Commit mode needs to know whether the body was produced in full.
        yield from self._result
        self._done = True

    def close(self) -> None:
        try:
            close = getattr(self._result, "close", None)
            if close is not None:
                close()
        except BaseException as exc:
            self._handle.finish(exc, succeeded=False)
            raise
        succeeded = self._done or self._handle._mode != "commit"
        # A failed commit is logged by the handle; the headers are gone already.
        with contextlib.suppress(psycopg2.Error):
            self._handle.finish(None, succeeded=succeeded)
