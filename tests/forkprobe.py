"""Run as a script by test_fork.py: a parent with pooled connections forks a child.

    python forkprobe.py '{"dsn": ..., "fork": "os"|"ctypes", "exit": "normal"|"sys_exit"|"os_exit",
                          "lock_held": false}'

Prints one JSON object: what the child saw and what the parent saw after the
child exited. Running in its own process lets the child exit "normally"
(interpreter shutdown, atexit, finalizers) without touching pytest.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import threading
import time
from typing import Any

from pgpool_wsgi import ConnectionPool, _forkmark


def socket_inodes() -> set[str]:
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            found.add(target)
    return found


def inode(conn: Any) -> str:
    return os.readlink(f"/proc/self/fd/{conn.fileno()}")


def query(conn: Any, sql: str, params: tuple[Any, ...] | None = None) -> Any:
    with conn.cursor() as cur:
        cur.execute(sql, params)
        row = cur.fetchone()
    conn.rollback()
    return row[0]


def carried_released(fd: int, parent_inode: str) -> bool:
    """The child no longer holds the parent's socket under that number (closed, or reused)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") != parent_inode
    except OSError:
        return True


def child(pool: ConnectionPool, parent_inodes: set[str], parent_pids: set[int], carried: Any,
          return_first: bool) -> dict[str, Any]:
    carried_fd, carried_inode = carried.fileno(), inode(carried)
    before = socket_inodes() & parent_inodes
    carried_error = None
    if return_first:
        # Before this process has checked anything out: the pool has not yet
        # noticed the fork (no hooks ran with a C fork).
        try:
            pool.putconn(carried)
        except Exception as exc:  # noqa: BLE001 - reported to the test
            carried_error = repr(exc)
    conn = pool.getconn(timeout=10)
    pid = query(conn, "SELECT pg_backend_pid()")
    echo = query(conn, "SELECT %s::text", ("child-token",))
    if not return_first:
        try:
            pool.putconn(carried)  # checked out before the fork: dropped quietly
        except Exception as exc:  # noqa: BLE001 - reported to the test
            carried_error = repr(exc)
    stats = pool.stats()
    after = socket_inodes() & parent_inodes
    pool.putconn(conn)
    return {"backend_pid": pid, "own_backend": pid not in parent_pids, "echo": echo,
            "carried_released_in_child": carried_released(carried_fd, carried_inode),
            "inherited_fds_before_checkout": len(before), "inherited_fds_after_checkout": len(after),
            "carried_error": carried_error, "stats": stats}


def main() -> int:
    args = json.loads(sys.argv[1])
    if os.environ.get("PGPOOL_TEST_FORK_CHECK") == "pid":
        _forkmark.refuse()  # the fallback, as where the kernel refuses MADV_WIPEONFORK
    pool = ConnectionPool(args["dsn"], max_size=6, timeout=10)
    held = [pool.getconn() for _ in range(2)]
    carried = pool.getconn()
    idle = pool.getconn()
    idle_pid = query(idle, "SELECT pg_backend_pid()")
    pool.putconn(idle)
    conns = [*held, carried, idle]
    parent_pids = {query(c, "SELECT pg_backend_pid()") for c in conns}
    parent_inodes = {inode(c) for c in conns}
    held_pids = [query(c, "SELECT pg_backend_pid()") for c in held]

    blocker = None
    if args.get("lock_held"):
        locked = threading.Event()

        def hold_lock() -> None:
            with pool._state.lock:
                locked.set()
                time.sleep(3)

        blocker = threading.Thread(target=hold_lock, daemon=True)
        blocker.start()
        locked.wait(5)

    read_end, write_end = os.pipe()
    pid = ctypes.CDLL(None).fork() if args["fork"] == "ctypes" else os.fork()
    if pid == 0:
        os.close(read_end)
        code = 0
        try:
            report = child(pool, parent_inodes, parent_pids, carried, bool(args.get("return_first")))
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            report = {"error": repr(exc)}
            code = 3
        os.write(write_end, json.dumps(report).encode())
        os.close(write_end)
        if args["exit"] == "os_exit":
            os._exit(code)
        if args["exit"] == "sys_exit":
            sys.exit(code)
        return code  # normal interpreter shutdown in the child

    os.close(write_end)
    chunks = []
    while True:
        chunk = os.read(read_end, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    deadline = time.monotonic() + 30
    status = None
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.01)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    child_report = json.loads(b"".join(chunks) or b'{"error": "child wrote nothing"}')
    if blocker is not None:
        blocker.join(10)

    import psycopg2

    admin = psycopg2.connect(args["dsn"])
    alive = query(admin, "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (sorted(parent_pids),))
    admin.close()
    after = {
        "parent_backends_alive_server_side": alive,
        "held_pids_before": held_pids,
        "held_pids_after": [query(c, "SELECT pg_backend_pid()") for c in held],
        "carried_works": query(carried, "SELECT 7") == 7,
        "child_exit_status": status,
        "parent_pids": sorted(parent_pids),
        "idle_pid": idle_pid,
    }
    for conn in held:
        pool.putconn(conn)
    pool.putconn(carried)
    reused = [pool.getconn() for _ in range(4)]
    after["reused_pids"] = sorted(query(c, "SELECT pg_backend_pid()") for c in reused)
    for conn in reused:
        pool.putconn(conn)
    after["parent_stats"] = pool.stats()
    print(json.dumps({"fork_check": _forkmark.mechanism(), "child": child_report, "parent": after}))
    pool.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
