"""Run as a script by test_fork.py: fork while another thread is inside a query.

    python forkbusy.py '{"dsn": ..., "fork": "os"|"ctypes", "exit": "normal"|"sys_exit"|"os_exit"}'

psycopg2 holds a connection's mutex for the whole of ``execute()``; the child
gets it locked. The child runs under an alarm (default action: the kernel
kills it), so a hang is a failure, not a stuck test. Prints one JSON object.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
import time
from typing import Any

from pgpool_wsgi import ConnectionPool, _forkmark


def sockets() -> set[str]:
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            found.add(target)
    return found


def query(conn: Any, sql: str) -> Any:
    with conn.cursor() as cur:
        cur.execute(sql)
        row = cur.fetchone()
    conn.rollback()
    return row[0]


def child(pool: ConnectionPool, held: Any, inherited: set[str]) -> dict[str, Any]:
    conn = pool.getconn(timeout=10)
    pid = query(conn, "SELECT pg_backend_pid()")
    pool.putconn(conn)
    pool.putconn(held)  # checked out before the fork
    conn = pool.getconn(timeout=10)
    again = query(conn, "SELECT pg_backend_pid()")
    pool.putconn(conn)
    pool.check_invariants()
    stats = pool.stats()
    return {"backend_pid": pid, "same_backend_again": again == pid, "stats": stats,
            "inherited_sockets_left": len(sockets() & inherited)}


def main() -> int:
    args = json.loads(sys.argv[1])
    if os.environ.get("PGPOOL_TEST_FORK_CHECK") == "pid":
        _forkmark.refuse()  # the fallback, as where the kernel refuses MADV_WIPEONFORK
    pool = ConnectionPool(args["dsn"], max_size=4, timeout=10)
    held = pool.getconn()
    idle = pool.getconn()
    pool.putconn(idle)
    started = threading.Event()
    busy_result: list[Any] = []

    def busy() -> None:
        conn = pool.getconn()
        busy_result.append(query(conn, "SELECT pg_backend_pid()"))
        started.set()
        with conn.cursor() as cur:
            cur.execute("SELECT pg_sleep(1)")  # the fork happens in here
        conn.rollback()
        pool.putconn(conn)
        busy_result.append("done")

    thread = threading.Thread(target=busy, daemon=True)
    thread.start()
    started.wait(10)
    time.sleep(0.3)
    inherited = sockets()
    parent_pids = {query(held, "SELECT pg_backend_pid()"), busy_result[0]}
    read_end, write_end = os.pipe()
    pid = ctypes.CDLL(None).fork() if args["fork"] == "ctypes" else os.fork()
    if pid == 0:
        signal.alarm(15)  # default action: killed; a hang becomes a failure
        os.close(read_end)
        code = 0
        try:
            report = child(pool, held, inherited)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            report, code = {"error": repr(exc)}, 3
        os.write(write_end, json.dumps(report).encode())
        os.close(write_end)
        if args["exit"] == "os_exit":
            os._exit(code)
        sys.exit(code)  # "normal" and "sys_exit": interpreter shutdown either way
    os.close(write_end)
    deadline = time.monotonic() + 20  # a child hung inside fork() has no alarm yet
    status = None
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.01)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        status = "hung"
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    child_report = json.loads(b"".join(chunks) or b'{"error": "child wrote nothing"}')
    child_report["exit_status"] = status
    child_report["parent_pids"] = sorted(parent_pids)
    thread.join(10)
    parent = {"busy_finished": busy_result[-1] == "done", "held_works": query(held, "SELECT 7") == 7}
    pool.putconn(held)
    pool.check_invariants()
    parent["stats"] = pool.stats()
    print(json.dumps({"fork_check": _forkmark.mechanism(), "child": child_report, "parent": parent}))
    pool.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
