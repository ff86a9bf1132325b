"""What the pool does to one psycopg2 connection: test, reset, close, drop.

None of these take a lock; several do network I/O, so the pool calls them
outside its lock.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator
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

_monotonic = time.monotonic


class Watcher:
    """Which of a process's connections have input: one poll() over all of them.

    An idle connection has nothing to read. Input means the server either
    sent a notification (fine) or a FATAL error and closed (dead); see
    :func:`examine`. One look serves every checkout for ``SNAPSHOT_TTL``
    seconds, so a busy process makes one system call (which also lets other
    threads take the GIL) per millisecond, not one per checkout.

    ``snapshot`` is ``(fresh_until, ready_fds)``, published in one store
    once poll() has returned, and stamped with the time the poll *started*:
    a close that came before that time is in it. A checkout uses no snapshot
    older than ``SNAPSHOT_TTL``; while another thread's look is under way it
    waits for that one (a zero-timeout poll: short). So a server close is
    seen at most ``SNAPSHOT_TTL`` late, for every connection, also one that
    came back after the look.

    Any watched socket the look saw readable is a suspect, whatever it did
    since: a connection killed while it was out and returned since is no
    exception. A socket that was readable only because a reply was in
    flight (the connection was in use at look time) is a false suspect:
    :func:`examine` polls it again first and keeps it, at the cost of one
    cheap system call.

    add() and remove() are called under the pool lock; look() takes a lock
    of its own and never the pool lock.
    """

    __slots__ = ("_lock", "_owners", "_poll", "snapshot")

    def __init__(self) -> None:
        self._poll = _poll() if _poll is not None else _SelectPoll()
        self._lock = threading.Lock()
        # fd -> the slot that registered it. When a backend dies mid-query,
        # libpq closes the socket and the next connect may get the same
        # number: the broken connection's removal must not unwatch the new one.
        self._owners: dict[int, object] = {}
        self.snapshot: tuple[float, frozenset[int]] = (0.0, frozenset())  # stale: the first checkout looks

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

    def look(self, now: float, *, force: bool = False) -> frozenset[int]:
        """The ready descriptors, seen no earlier than ``now - SNAPSHOT_TTL``.

        ``force``: poll again even if the last look is fresh.
        """
        with self._lock:  # another look under way: wait for it, then use it if it is fresh
            fresh_until, ready = self.snapshot
            if force or now >= fresh_until:
                started = _monotonic()  # before the poll: a close after it may be missed, not one before
                ready = frozenset(fd for fd, _ in self._poll.poll(0))
                self.snapshot = (started + SNAPSHOT_TTL, ready)  # published only now, whole
        return ready

    def suspects(self, slots: Iterable[Any]) -> list[Any]:
        """The slots (with ``fd``) whose socket the last look saw readable."""
        ready = self.snapshot[1]
        return [s for s in slots if s.fd in ready]


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
        notices = conn.notices
        last = _last(notices)
        conn.poll()
        fatal = any(str(n).startswith("FATAL") for n in _added_since(notices, last))
    except (psycopg2.Error, OSError, ValueError):
        return False
    return not fatal and not conn.closed and not _readable(fd)


def _last(notices: Any) -> Any:
    try:
        return notices[-1] if notices else None
    except (TypeError, LookupError):
        return None  # a user's notices object without indexing: see _added_since


def _added_since(notices: Any, last: Any) -> list[Any]:
    """The notices appended after ``last``, found by identity.

    Not by count: psycopg2 trims a list to its last 50 notices (and a user's
    deque has its own maxlen), so once full the length no longer grows.
    """
    added = []
    try:
        for notice in reversed(notices):
            if notice is last:
                break
            added.append(notice)
    except TypeError:
        return []  # cannot tell: the end-of-file test in examine() still decides
    return added


@contextlib.contextmanager
def outside_transaction(conn: Any) -> Iterator[Any]:
    """A plain cursor in autocommit; autocommit is put back as it was, whatever happens.

    The base class's cursor(): a ``cursor_factory`` (RealDictCursor...) or a
    connection subclass (LoggingConnection, even before initialize()) would
    change what our internal queries return, log them, or refuse them.
    """
    autocommit = conn.autocommit
    try:
        if not autocommit:
            conn.autocommit = True
        with ext.connection.cursor(conn, cursor_factory=ext.cursor) as cur:
            yield cur
    finally:
        if conn.autocommit != autocommit and not conn.closed:
            conn.autocommit = autocommit


def ping(conn: Any) -> bool:
    """One ``SELECT 1`` round trip, outside any transaction; the connection is left as it was."""
    try:
        with outside_transaction(conn) as cur:
            cur.execute("SELECT 1")
    except Exception:  # noqa: BLE001 - whatever went wrong, the connection is not fit
        return False
    return True


class Session:
    """The session characteristics a returned connection is restored to.

    ``primary_only``: the DSN asks libpq for a writable server
    (``target_session_attrs`` read-write or primary), so a connection whose
    server now reports itself read-only must not be reused.
    """

    __slots__ = ("autocommit", "isolation_level", "readonly", "deferrable", "encoding", "reported_encoding",
                 "primary_only")

    def __init__(self, conn: Any) -> None:
        self.autocommit = conn.autocommit
        self.isolation_level = conn.isolation_level
        self.readonly = conn.readonly
        self.deferrable = conn.deferrable
        self.encoding: str = conn.encoding  # psycopg2's codec
        self.reported_encoding: str | None = conn.get_parameter_status("client_encoding")  # the server's
        attrs = conn.get_dsn_parameters().get("target_session_attrs")
        self.primary_only = attrs in ("read-write", "primary")

    def restore(self, conn: Any) -> None:
        """Put back what the request changed.

        Usually no I/O (psycopg2 >= 2.7 applies these with the next BEGIN),
        but leaving autocommit after ``set_session()`` sends ``SET
        default_transaction_*`` and a changed client encoding sends ``SET
        client_encoding``: callers hold no lock here.
        """
        if conn.autocommit != self.autocommit:
            conn.autocommit = self.autocommit
        if (conn.isolation_level != self.isolation_level or conn.readonly != self.readonly
                or conn.deferrable != self.deferrable):
            # psycopg2 reads None as "leave as is"; "DEFAULT" means the server's default.
            conn.set_session(isolation_level=_or_default(self.isolation_level),
                             readonly=_or_default(self.readonly), deferrable=_or_default(self.deferrable))
        if (conn.encoding != self.encoding
                or conn.get_parameter_status("client_encoding") != self.reported_encoding):
            _restore_encoding(conn, self.encoding)


def _or_default(value: Any) -> Any:
    return "DEFAULT" if value is None else value


def _server_encoding(conn: Any) -> str:
    # The server reports client_encoding (EUC_JP); psycopg2 names it without punctuation (EUCJP).
    reported = conn.get_parameter_status("client_encoding") or ""
    return "".join(c for c in reported if c.isalnum()).upper()


def _restore_encoding(conn: Any, encoding: str) -> None:
    """Make the server and psycopg2's codec agree on the session's encoding again.

    They part when a request called set_client_encoding() and ``reset_sql``
    (DISCARD ALL) then reset only the server, or when a request ran ``SET
    client_encoding`` itself: text would be decoded wrongly, silently.
    """
    if conn.encoding != encoding:
        conn.set_client_encoding(encoding)  # sends SET client_encoding, switches the codec
    if _server_encoding(conn) != encoding:  # psycopg2 skips the SET when its codec matches already
        with outside_transaction(conn) as cur:
            cur.execute("SET client_encoding TO %s", (encoding,))


def untouched(conn: Any, session: Session) -> bool:
    """May a returned connection skip :func:`reset`? Attribute reads only (the pool's fast path).

    False when reset() has something to do: a transaction (two-phase ones
    included: then psycopg2's status is not ready while the server's
    transaction status reads idle), changed characteristics or client
    encoding (psycopg2's codec), notices or notifications to forget, or a DSN that wants a
    writable server (reset() reads the server's read-only report).

    A ``SET client_encoding`` run in SQL is not seen here: like any SET made
    outside a rolled-back transaction it survives until a reset runs (the
    README says so; psycopg2 itself decodes wrongly after it). Reading the
    server's report would cost about 300 ns on every return.
    """
    return (not conn.get_transaction_status() and conn.status == _READY and not session.primary_only
            and conn.autocommit is session.autocommit and conn.isolation_level == session.isolation_level
            and conn.readonly == session.readonly and conn.deferrable == session.deferrable
            and not conn.notices and not conn.notifies and conn.encoding == session.encoding)


_READY = ext.STATUS_READY
# reset()'s reason when the server turned read-only: the pool's other idle
# connections (to the same server) have not heard yet, and each would fail a request.
READ_ONLY = "the server reports the session read-only; the DSN's target_session_attrs wants a writable one"
_BROKEN = (ext.TRANSACTION_STATUS_UNKNOWN, ext.TRANSACTION_STATUS_ACTIVE)
_OPEN = (ext.TRANSACTION_STATUS_INTRANS, ext.TRANSACTION_STATUS_INERROR)


def reset(conn: Any, session: Session, reset_sql: str | None) -> str | None:
    """Make a returned connection fit for the next user; network I/O.

    Returns ``None`` when it is fit, else the reason it must be discarded.
    """
    if conn.closed:
        return "closed"
    status = conn.get_transaction_status()  # not conn.info's: ten times dearer
    if status in _BROKEN:
        return "query still running" if status == ext.TRANSACTION_STATUS_ACTIVE else "connection lost"
    try:
        # psycopg2's own status is not "ready" after tpc_begin()/tpc_prepare(),
        # even a failed one, while the server's transaction status reads IDLE.
        if status in _OPEN or conn.status != ext.STATUS_READY:
            _rollback(conn)
        if reset_sql:
            with outside_transaction(conn) as cur:
                cur.execute(reset_sql)
        session.restore(conn)
    except Exception as exc:  # noqa: BLE001 - any failure: the connection is not fit
        return f"reset failed: {type(exc).__name__}"
    if session.primary_only and _reports_read_only(conn):
        return READ_ONLY
    # What the server said during this checkout is the last user's business.
    _clear(conn, "notices")
    _clear(conn, "notifies")
    return None


def _rollback(conn: Any) -> None:
    try:
        conn.rollback()
    except psycopg2.ProgrammingError:
        # rollback() refuses a two-phase transaction (begun, or prepared):
        # tpc_rollback() ends it, with ROLLBACK PREPARED if it was prepared.
        conn.tpc_rollback()


def _reports_read_only(conn: Any) -> bool:
    """Has the server said (ParameterStatus, PostgreSQL 14+, no round trip) that it takes no writes?

    A fenced primary (``default_transaction_read_only = on`` and a reload)
    or a demoted one (``in_hot_standby``). The connection learns it with the
    first statement it runs after the change.
    """
    parameter = conn.get_parameter_status
    return bool(parameter("default_transaction_read_only") == "on" or parameter("in_hot_standby") == "on")


def _clear(conn: Any, name: str) -> None:
    messages = getattr(conn, name)
    if messages:
        try:
            messages.clear()  # a list, or a deque the user put there: keep their object
        except AttributeError:
            setattr(conn, name, [])


def is_broken_error(exc: BaseException) -> bool:
    """Does this exception by itself make the connection unfit for reuse?

    Only an interrupt: a ``BaseException`` that is not an ``Exception``
    (``GreenletExit``, a gevent timeout, ``KeyboardInterrupt``) may have
    stopped psycopg2 halfway through a query. Any other exception says
    nothing about the connection (our own ``PoolError`` from another pool, a
    driver error raised before anything was sent): what it left behind is
    judged by :func:`reset` from the connection's own state (closed, status
    unknown or active, a failed rollback).
    """
    return not isinstance(exc, Exception)


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
    out at fork time). Its number is pointed at a placeholder and stays
    reserved, so any use of it fails harmlessly instead of writing to a
    socket that this process opens later under the same number; it is closed
    when the connection is given back (pass the returned ident then).
    Otherwise the number is closed at once. Returns what the number refers to
    afterwards.

    The placeholder is one end of a fresh socket pair whose other end is
    closed: reads see end of file and writes fail (EPIPE), like a dead
    connection, and its identity is its own. (/dev/null's is shared by every
    open of it: if the application closed the number and opened /dev/null
    itself, the return would close the application's file.)
    """
    if fd < 0 or file_id(fd) != ident:
        return None
    if not held:
        with contextlib.suppress(OSError):
            os.close(fd)
        return None
    ours, other = socket.socketpair()
    try:
        other.close()
        os.dup2(ours.fileno(), fd)
    finally:
        ours.close()
    return file_id(fd)
