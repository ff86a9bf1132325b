"""Fork safety (SPEC F1-F4), each case in a fresh process running tests/forkprobe.py."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

PROBE = Path(__file__).with_name("forkprobe.py")


@pytest.fixture(autouse=True, params=["wipeonfork", "pid"])
def fork_check(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every fork test runs with the fork mark's page and with its fallback, the pid comparison."""
    monkeypatch.setenv("PGPOOL_TEST_FORK_CHECK", request.param)
    return str(request.param)


def run_probe(dsn: str, **args: Any) -> dict[str, Any]:
    done = subprocess.run([sys.executable, str(PROBE), json.dumps({"dsn": dsn, **args})],
                          capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["fork_check"] == os.environ["PGPOOL_TEST_FORK_CHECK"]
    assert "error" not in report["child"], report["child"]
    return report


@pytest.mark.parametrize("ssl", [False, True], ids=["plain", "ssl"])
@pytest.mark.parametrize("exit_mode", ["normal", "sys_exit", "os_exit"])
@pytest.mark.parametrize("fork", ["os", "ctypes"], ids=["os.fork", "C-fork-no-hooks"])
def test_child_gets_own_connections_and_parent_keeps_working(pg, fork, exit_mode, ssl):
    dsn = pg.dsn(sslmode="require") if ssl else pg.dsn()
    report = run_probe(dsn, fork=fork, exit=exit_mode)
    child, parent = report["child"], report["parent"]

    # F1: the child's checkout is a backend the child opened.
    assert child["own_backend"] is True
    assert child["backend_pid"] not in parent["parent_pids"]
    assert child["echo"] == "child-token"
    assert child["stats"]["fork_resets"] == 1
    assert child["stats"]["connects"] == 1 and child["stats"]["discarded"] == 0
    # F2: the inherited sockets are released, not kept open in the child.
    assert child["inherited_fds_after_checkout"] == 0
    if fork == "os":
        # The at-fork hooks ran: the parent closed its idle connection and the
        # child released the other three before it did anything.
        assert child["inherited_fds_before_checkout"] == 0
    else:
        assert child["inherited_fds_before_checkout"] == 4
    # F3: a connection checked out before the fork, returned in the child.
    assert child["carried_error"] is None

    # F2: nothing was sent on the parent's sockets.
    assert parent["child_exit_status"] == 0
    assert parent["held_pids_after"] == parent["held_pids_before"]
    assert parent["carried_works"] is True
    assert parent["parent_backends_alive_server_side"] == (3 if fork == "os" else 4)
    # Every connection the parent kept still works after the child is gone.
    kept = set(parent["parent_pids"]) - ({parent["idle_pid"]} if fork == "os" else set())
    assert kept <= set(parent["reused_pids"])
    assert parent["parent_stats"]["connects"] == (5 if fork == "os" else 4)
    assert parent["parent_stats"]["discarded"] == 0
    assert parent["parent_stats"]["fork_resets"] == 0


@pytest.mark.parametrize("lock_held", [False, True], ids=["lock-free", "lock-held-at-fork"])
@pytest.mark.parametrize("fork", ["os", "ctypes"], ids=["os.fork", "C-fork-no-hooks"])
def test_fork_while_another_thread_holds_the_pool_lock(pg, fork, lock_held):
    # The child's first act is to return the connection it carried over:
    # before any checkout, so with a C fork the pool has not noticed yet.
    report = run_probe(pg.dsn(), fork=fork, exit="os_exit", lock_held=lock_held, return_first=True)
    child, parent = report["child"], report["parent"]
    assert child["own_backend"] is True and child["carried_error"] is None
    assert child["carried_released_in_child"] is True  # its descriptor released by the child, not kept
    assert child["inherited_fds_after_checkout"] == 0
    assert parent["child_exit_status"] == 0
    assert parent["held_pids_after"] == parent["held_pids_before"] and parent["carried_works"] is True


BUSY = Path(__file__).with_name("forkbusy.py")


@pytest.mark.parametrize("exit_mode", ["normal", "sys_exit", "os_exit"])
@pytest.mark.parametrize("fork", ["os", "ctypes"], ids=["os.fork", "C-fork-no-hooks"])
def test_fork_while_another_thread_is_mid_query(pg, fork, exit_mode):
    # psycopg2 holds the connection's mutex during execute(): the child must
    # never call into psycopg2 on that connection (it would wait forever).
    done = subprocess.run([sys.executable, str(BUSY), json.dumps({"dsn": pg.dsn(), "fork": fork,
                                                                  "exit": exit_mode})],
                          capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["fork_check"] == os.environ["PGPOOL_TEST_FORK_CHECK"]
    child, parent = report["child"], report["parent"]
    assert child["exit_status"] == 0, child  # not killed by its alarm: no hang
    assert "error" not in child, child
    assert child["backend_pid"] not in child["parent_pids"] and child["same_backend_again"]
    assert child["inherited_sockets_left"] == 0
    assert child["stats"]["in_use"] == 0 and child["stats"]["size"] == 1
    assert parent["busy_finished"] and parent["held_works"]
    assert parent["stats"]["discarded"] == 0 and parent["stats"]["in_use"] == 0


def test_one_failure_does_not_stop_releasing_the_others(monkeypatch):
    """Pure logic with real descriptors (pipes stand in for inherited sockets)."""
    import os

    from pgpool_wsgi import ConnectionPool, _conn
    from pgpool_wsgi._state import Slot, State

    pool = ConnectionPool("host=127.0.0.1 port=1 dbname=x")
    stale = State(1, max_size=3, watch=False)  # "another process's" state
    pipes = [os.pipe() for _ in range(3)]
    for i, (read_end, _) in enumerate(pipes):
        slot = Slot.__new__(Slot)
        slot.conn, slot.fd, slot.out_since = object(), read_end, (None if i < 2 else 1.0)
        slot.file_id = _conn.file_id(read_end)
        stale.slots[slot.conn] = slot
    calls: list[int] = []
    real = _conn.drop_inherited

    def drop(fd: int, ident: object, *, held: bool) -> object:
        calls.append(fd)
        if len(calls) == 1:
            raise OSError("injected")
        return real(fd, ident, held=held)

    monkeypatch.setattr(_conn, "drop_inherited", drop)
    try:
        with pytest.raises(OSError, match="injected"):
            pool._forget(stale)
        assert len(calls) == 3 and stale.slots == {}
        # The two released: the idle one closed, the lent one pointed at a placeholder socket.
        assert not _open(pipes[1][0])
        assert os.readlink(f"/proc/self/fd/{pipes[2][0]}").startswith("socket:")
        assert len(pool._inherited) == 1
    finally:
        for read_end, write_end in pipes:
            for fd in (read_end, write_end):
                with contextlib.suppress(OSError):
                    os.close(fd)


def _open(fd: int) -> bool:
    import os

    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_a_number_reused_by_the_child_is_left_alone():
    """After a C fork the release waits for first use; the number may be the child's own file by then."""
    import os

    from pgpool_wsgi import ConnectionPool, _conn
    from pgpool_wsgi._state import Slot, State

    pool = ConnectionPool("host=127.0.0.1 port=1 dbname=x")
    stale = State(1, max_size=2, watch=False)
    read_end, write_end = os.pipe()
    other_read, other_write = os.pipe()
    slot = Slot.__new__(Slot)
    slot.conn, slot.fd, slot.out_since = object(), read_end, None
    slot.file_id = _conn.file_id(other_read)  # the socket it was is gone; read_end is something else now
    stale.slots[slot.conn] = slot
    try:
        pool._forget(stale)
        assert _open(read_end)  # not ours any more: untouched
    finally:
        for fd in (read_end, write_end, other_read, other_write):
            with contextlib.suppress(OSError):
                os.close(fd)


def test_returning_a_lent_connection_never_closes_the_childs_own_file(make_pool):
    """A connection out at fork time: the child uses it (fails), closes it, opens /dev/null
    itself (same number), then gives the connection back. The child's file must survive."""
    import os
    import time

    import psycopg2

    pool = make_pool(max_size=2)
    conn = pool.getconn()
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
    conn.rollback()
    fd = conn.fileno()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        try:
            os.close(read_end)
            with contextlib.suppress(psycopg2.Error), conn.cursor() as cur:
                cur.execute("SELECT 1")  # on the placeholder: fails harmlessly
            conn.close()  # frees the number
            mine = open(os.devnull, "w")  # noqa: SIM115 - the child's own file, closed by _exit
            same = mine.fileno() == fd
            pool.putconn(conn)
            mine.write("x")
            mine.flush()
            os.write(write_end, f"ok same_number={same}".encode())
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            os.write(write_end, f"error {exc!r}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        deadline = time.monotonic() + 30
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            assert time.monotonic() < deadline, "the child hangs"
            time.sleep(0.01)
        pid = 0
        report = os.read(read_end, 4096).decode()
    finally:
        if pid:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(read_end)
    assert report == "ok same_number=True", report
    with conn.cursor() as cur:  # the parent's connection is untouched
        cur.execute("SELECT 1")
    pool.putconn(conn)
