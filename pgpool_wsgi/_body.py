"""The body the middleware hands to the server: it runs in the request's scope and returns the connections."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Callable

import psycopg2

from ._request import ACTIVE, Flow
from .errors import PoolError

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment


class Body:
    """The app's body iterable, returning the connections when the server closes it."""

    __slots__ = ("_done", "_environ", "_flow", "_on_pool_error", "_result")

    def __init__(self, result: Iterable[bytes], flow: Flow, environ: WSGIEnvironment,
                 on_pool_error: Callable[[WSGIEnvironment, Flow, PoolError], Iterable[bytes]]) -> None:
        self._result = result
        self._flow = flow
        self._environ = environ  # for the log line of a 503 (environ does not refer to us)
        self._on_pool_error = on_pool_error
        self._done = False

    def __iter__(self) -> Iterator[bytes]:
        return self._stream()

    def _stream(self) -> Iterator[bytes]:
        flow = active = self._flow
        try:
            token = ACTIVE.set(active)  # the body's code is the request's too: sub-requests reuse
            try:
                chunks = iter(self._result)
            finally:
                ACTIVE.reset(token)
            while True:
                token = ACTIVE.set(active)
                try:
                    chunk = next(chunks)
                except StopIteration:
                    break
                finally:
                    ACTIVE.reset(token)
                if not flow.out:
                    if flow.refused is not None:
                        break  # the app answered 5xx after a pool error, in its first iteration
                    # Leading empty chunks are not passed on: some servers
                    # (gunicorn) send the status line on any chunk.
                    if not chunk:
                        continue
                    if not flow.open():
                        yield from flow.commit_failed()
                        return
                    flow.out = True
                yield chunk
        except PoolError as exc:
            # A lazy checkout failed while the body was being produced.
            yield from self._on_pool_error(self._environ, flow, exc)
            return
        if flow.refused is not None:  # never committed (not done): the 503 replaces the response
            yield from self._on_pool_error(self._environ, flow, flow.refused)
            return
        self._done = True
        if not flow.out and not flow.open():
            yield from flow.commit_failed()

    def close(self) -> None:
        token = ACTIVE.set(self._flow)
        try:
            close = getattr(self._result, "close", None)
            if close is not None:
                close()
        except BaseException as exc:
            self._flow.finish(exc, succeeded=False)
            raise
        finally:
            ACTIVE.reset(token)
        # A failed commit is logged by the handle; the status line is out already.
        with contextlib.suppress(psycopg2.Error):
            self._flow.finish(None, succeeded=self._done)


class SizedBody(Body):
    """A Body whose inner iterable has a length: servers (waitress) use it for Content-Length."""

    __slots__ = ()

    def __len__(self) -> int:
        return len(self._result)  # type: ignore[arg-type]
