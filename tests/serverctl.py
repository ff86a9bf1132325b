"""Start, watch and stop a real WSGI server as a subprocess; look at its processes in /proc.

Shared by tests/test_servers.py and demo/run_demo.py. A :class:`Server` runs
in a session (and so a process group) of its own, with its output in a log
file; :meth:`Server.stop` ends that group, SIGTERM first and SIGKILL after a
bounded wait, and only that group.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from tests.loadgen import get

HOST = "127.0.0.1"


class ServerError(RuntimeError):
    """The server did not come up, or went away."""


class Server:
    """One server process (the master, for pre-forking servers) and its process group."""

    def __init__(self, argv: Sequence[str], *, port: int, env: Mapping[str, str], log_path: Path,
                 cwd: Path | None = None) -> None:
        self.argv = list(argv)
        self.port = port
        self.env = dict(env)
        self.log_path = log_path
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, cwd=self.cwd, start_new_session=True)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, path: str = "/_pool", timeout: float = 60.0) -> None:
        """Until ``GET path`` answers 200; fail early if the process exits."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise ServerError(f"{self.argv[0]} exited ({code}) before serving:\n{self.log_tail()}")
            try:
                status, body = get(HOST, self.port, path, timeout=2)
            except (OSError, http.client.HTTPException) as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if status == 200:
                    return
                last = f"{status}: {body[:200]!r}"
            time.sleep(0.1)
        raise ServerError(f"{self.argv[0]} did not answer {path} within {timeout:g} s (last: {last}):\n"
                          f"{self.log_tail()}")

    def children(self) -> list[int]:
        """Live child processes of the server process (its workers)."""
        return children_of(self.pid)

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def stop(self, timeout: float = 15.0) -> None:
        """End the process group we created: SIGTERM, then SIGKILL after ``timeout`` seconds."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the group id is the pid we started
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout)
        # Workers may outlive their master for a moment: wait for the whole group.
        while time.monotonic() < deadline and _group_alive(pgid):
            time.sleep(0.05)
        if _group_alive(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        self.proc.wait(timeout=10)


def _group_alive(pgid: int) -> bool:
    """Is any process of group ``pgid`` still running (zombies left to init do not count)?"""
    return any(state != "Z" and pgrp == pgid for _, state, _, pgrp in _proc_stats())


def _proc_stats() -> Iterator[tuple[int, str, int, int]]:
    """(pid, state, ppid, pgrp) of every process, from /proc/<pid>/stat."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces or parentheses: fields start after the last ")".
        fields = stat[stat.rindex(")") + 2:].split()
        yield int(entry), fields[0], int(fields[1]), int(fields[2])


@contextlib.contextmanager
def running(argv: Sequence[str], *, port: int, env: Mapping[str, str], log_path: Path,
            cwd: Path | None = None, ready_path: str = "/_pool", ready_timeout: float = 60.0) -> Iterator[Server]:
    """Start a server, wait until ``GET ready_path`` answers 200, and always stop it."""
    server = Server(argv, port=port, env=env, log_path=log_path, cwd=cwd)
    try:
        server.start()
        server.wait_ready(ready_path, timeout=ready_timeout)
        yield server
    finally:
        server.stop()


def children_of(pid: int) -> list[int]:
    """Running processes whose parent is ``pid``."""
    return sorted(child for child, state, ppid, _ in _proc_stats() if ppid == pid and state != "Z")


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(OSError):
            target = os.readlink(f"{fd_dir}/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    return inodes


def tcp_connections_to(pid: int, port: int) -> int:
    """How many TCP sockets process ``pid`` holds whose remote port is ``port`` (any state)."""
    inodes = _socket_inodes(pid)
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as rows:
            next(rows)  # header
            for row in rows:
                cols = row.split()
                remote_port = int(cols[2].rsplit(":", 1)[1], 16)
                if remote_port == port and cols[9] in inodes:
                    count += 1
    return count
