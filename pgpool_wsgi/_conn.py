"""What the pool does to one psycopg2 connection: test, reset, close, drop.

None of these take a lock; several do network I/O, so the pool calls them
outside its lock.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import threading
from collections.abc import Iterable
from typing import Any

import psycopg2
import psycopg2.extensions as ext


def _original_poll() -> Any:
    # gevent may replace select.poll after we are imported; a zero-timeout
    # poll never blocks, so the plain one is right (and cheaper) either way.
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("select"):
        return monkey.get_original("select", "poll")
    return getattr(select, "poll", None)


_poll = _original_poll()
_READ_EVENTS = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP


class _SelectPoll:
    """select.poll()'s interface over select(), for platforms without poll()."""

    def __init__(self) -> None:
        self._fds: set[int] = set()

    def register(self, fd: int, events: int) -> None:
        self._fds.add(fd)

    def unregister(self, fd: int) -> None:
        self._fds.discard(fd)

    def poll(self, timeout: int) -> list[tuple[int, int]]:
        readable = select.select(list(self._fds), [], [], timeout)[0] if self._fds else []
        return [(fd, select.POLLIN) for fd in readable]


SNAPSHOT_TTL = 0.001  # seconds one look at all sockets serves checkouts


class Watcher:
    """Which of a process's connections have input: one poll() over all of them.

    An idle connection has nothing to read. Input means the server either
    sent a notification (fine) or a FATAL error and closed (dead); see
    :func:`examine`. One look serves every checkout for ``SNAPSHOT_TTL``
    seconds, so a busy process makes one system call (which also lets other
    threads take the GIL) per millisecond, not one per checkout; a server
    close is seen at most a millisecond late.

    ``snapshot`` is ``(taken_at, ready_fds)``. A connection that was in use
    when the look was taken may have had a reply in flight: the look says
    nothing about it (it was alive when it came back, after the look).
    add() and remove() are called under the pool lock; look() takes a lock
    of its own and no pool lock, and a caller that finds another look under
    way goes on with the last one.
    """

    __slots__ = ("_lock", "_owners", "_poll", "fresh_until", "snapshot")

    def __init__(self) -> None:
        self._poll = _poll() if _poll is not None else _SelectPoll()
        self._lock = threading.Lock()
        # fd -> the slot that registered it. When a backend dies mid-query,
        # libpq closes the socket and the next connect may get the same
        # number: the broken connection's removal must not unwatch the new one.
        self._owners: dict[int, object] = {}
        self.snapshot: tuple[float, frozenset[int]] = (0.0, frozenset())
        self.fresh_until = 0.0

    def add(self, fd: int, owner: object) -> None:
        self._owners[fd] = owner
        self._poll.register(fd, _READ_EVENTS)  # registering again modifies: harmless

    def remove(self, fd: int, owner: object) -> None:
        if self._owners.get(fd) is owner:
            del self._owners[fd]
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._poll.unregister(fd)

    def watched(self) -> set[int]:
        return set(self._owners)

    def look(self, now: float, *, wait: bool = False) -> tuple[float, frozenset[int]]:
        if self._lock.acquire(wait):
            try:
                self.fresh_until = now + SNAPSHOT_TTL
                self.snapshot = (now, frozenset(fd for fd, _ in self._poll.poll(0)))
            finally:
                self._lock.release()
        return self.snapshot

    def suspects(self, slots: Iterable[Any]) -> list[Any]:
        """Idle slots that the last look saw input on (slots have ``fd`` and ``last_used``)."""
        taken_at, ready = self.snapshot
        return [s for s in slots if s.last_used <= taken_at and s.fd in ready]


def _readable(fd: int) -> bool:
    p = _poll() if _poll is not None else _SelectPoll()
    p.register(fd, _READ_EVENTS)
    return bool(p.poll(0))


def examine(conn: Any) -> bool:
    """Is an idle connection whose socket is readable still alive? No round trip.

    ``conn.poll()`` reads what is there: a NOTIFY is kept in
    ``conn.notifies``; a FATAL notice, an error, or input that stays there
    (end of file) means the server closed the session.
    """
    if conn.closed:
        return False
    try:
        fd = conn.fileno()
        if not _readable(fd):
            return True  # the look that sent us here is out of date
        seen = len(conn.notices)
        conn.poll()
    except (psycopg2.Error, OSError, ValueError):
        return False
    if any(n.startswith("FATAL") for n in conn.notices[seen:]):
        return False
    return not conn.closed and not _readable(fd)


def ping(conn: Any) -> bool:
    """One ``SELECT 1`` round trip, outside any transaction."""
    autocommit = conn.autocommit
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
        conn.autocommit = autocommit
    except (psycopg2.Error, OSError):
        return False
    return True


class Session:
    """The session characteristics a returned connection is restored to."""

    __slots__ = ("autocommit", "isolation_level", "readonly", "deferrable")

    def __init__(self, conn: Any) -> None:
        self.autocommit = conn.autocommit
        self.isolation_level = conn.isolation_level
        self.readonly = conn.readonly
        self.deferrable = conn.deferrable

    def restore(self, conn: Any) -> None:
        """Put back what the request changed.

        Usually no I/O (psycopg2 >= 2.7 applies these with the next BEGIN),
        but leaving autocommit after ``set_session()`` sends ``SET
        default_transaction_* TO DEFAULT``: callers hold no lock here.
        """
        if conn.autocommit != self.autocommit:
            conn.autocommit = self.autocommit
        if (conn.isolation_level != self.isolation_level or conn.readonly != self.readonly
                or conn.deferrable != self.deferrable):
            # psycopg2 reads None as "leave as is"; "DEFAULT" means the server's default.
            conn.set_session(isolation_level=_or_default(self.isolation_level),
                             readonly=_or_default(self.readonly), deferrable=_or_default(self.deferrable))


def _or_default(value: Any) -> Any:
    return "DEFAULT" if value is None else value


_BROKEN = (ext.TRANSACTION_STATUS_UNKNOWN, ext.TRANSACTION_STATUS_ACTIVE)
_OPEN = (ext.TRANSACTION_STATUS_INTRANS, ext.TRANSACTION_STATUS_INERROR)


def reset(conn: Any, session: Session, reset_sql: str | None) -> str | None:
    """Make a returned connection fit for the next user; network I/O.

    Returns ``None`` when it is fit, else the reason it must be discarded.
    """
    if conn.closed:
        return "closed"
    status = conn.info.transaction_status
    if status in _BROKEN:
        return "query still running" if status == ext.TRANSACTION_STATUS_ACTIVE else "connection lost"
    try:
        if status in _OPEN:
            conn.rollback()
        if reset_sql:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(reset_sql)
        session.restore(conn)
    except (psycopg2.Error, OSError) as exc:
        return f"reset failed: {type(exc).__name__}"
    return None


def is_broken_error(exc: BaseException) -> bool:
    """Does this exception leave the connection unfit for reuse?

    A ``BaseException`` that is not an ``Exception`` (``GreenletExit``, a
    timeout) may have interrupted a query; a psycopg2 error without SQLSTATE
    came from the client or the transport, not from a statement.
    """
    if not isinstance(exc, Exception):
        return True
    return isinstance(exc, psycopg2.Error) and exc.pgcode is None


def close(conn: Any) -> None:
    """Close a connection this process opened (sends Terminate)."""
    with contextlib.suppress(psycopg2.Error, OSError):
        conn.close()


def close_all(conns: Iterable[Any]) -> None:
    """Close each of these connections, even if closing one of them is interrupted."""
    failure: BaseException | None = None
    for conn in conns:
        try:
            close(conn)
        except BaseException as exc:  # noqa: BLE001 - re-raised once all are closed
            failure = failure or exc
    if failure is not None:
        raise failure


def file_id(fd: int) -> tuple[int, int] | None:
    """What a descriptor number refers to (device, inode), or None if it is not open."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def drop_inherited(fd: int, ident: tuple[int, int] | None, *, held: bool) -> tuple[int, int] | None:
    """Release the descriptor of a connection another process opened; no byte is sent.

    Nothing here calls into psycopg2: it holds a per-connection mutex during
    every call, and a fork taken while another thread was inside one copies
    that mutex locked, so even ``close()`` would wait forever. Freeing the
    object later is safe (psycopg2 skips the close when the pid differs).

    ``ident`` (:func:`file_id` when the connection was opened): the number is
    only touched if it still refers to that socket. After a fork done in C
    the release waits for the first checkout, and by then the process may
    have closed the number and reused it for a file of its own.

    ``held``: the application may still hold the connection (it was checked
    out at fork time). Its number is pointed at /dev/null and stays reserved,
    so any use of it fails harmlessly instead of writing to a socket that
    this process opens later under the same number; it is closed when the
    connection is given back (pass the returned ident then). Otherwise the
    number is closed at once. Returns what the number refers to afterwards.
    """
    if fd < 0 or file_id(fd) != ident:
        return None
    if not held:
        with contextlib.suppress(OSError):
            os.close(fd)
        return None
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)
    return file_id(fd)
