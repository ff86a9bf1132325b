"""A throwaway PgBouncer for tests: its own config, its own port, always stopped.

``PgBouncer`` writes ``pgbouncer.ini`` and a ``userlist.txt`` (``auth_type =
trust``: names must still be listed) into a temporary directory, starts
``pgbouncer`` in the foreground on a free 127.0.0.1 port (no unix socket) and
stops it by the pid in its pid file. PgBouncer refuses to run as root, so when
euid is 0 the directory is handed to the ``postgres`` user and the process is
started with ``runuser -u postgres --``.

Every database name is routed to the given PostgreSQL server; ``postgres`` is
an admin user, so :meth:`PgBouncer.admin` can run ``SHOW POOLS`` and friends on
the ``pgbouncer`` console database.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.pgserver import SERVER_USER, free_port

USERS = ("postgres", "app")


def find_pgbouncer() -> str:
    """The pgbouncer binary: PATH, then /usr/sbin (Debian puts it there)."""
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/local/sbin")
    if found:
        return found
    raise RuntimeError(
        "pgbouncer was not found on PATH or in /usr/sbin. Install it, e.g. on Debian/Ubuntu: "
        "sudo apt-get install pgbouncer   (as root, `make test` installs it)"
    )


def _is_pgbouncer(pid: int, config: Path) -> bool:
    """Is ``pid`` still the pgbouncer running ``config`` (not a stale pid file, not a reused pid)?"""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return str(config).encode() in cmdline and any(arg.endswith(b"pgbouncer") for arg in cmdline)


class PgBouncer:
    """One throwaway PgBouncer in front of ``host:port``; ``start()``, then ``stop()``.

    :param server_port: port of the PostgreSQL server to pool (on ``server_host``).
    :param pool_mode: ``transaction`` (default), ``session`` or ``statement``.
    :param default_pool_size: server connections per (database, user) pair.
    :param settings: more ``[pgbouncer]`` settings, overriding ours.

    ::

        bouncer = PgBouncer(server_port=pg.port, default_pool_size=2)
        try:
            bouncer.start()
            conn = psycopg2.connect(bouncer.dsn())
        finally:
            bouncer.stop()
    """

    def __init__(self, *, server_port: int, server_host: str = "127.0.0.1", pool_mode: str = "transaction",
                 default_pool_size: int = 2, settings: dict[str, str] | None = None, name: str = "bouncer") -> None:
        self.binary = find_pgbouncer()
        self.base = Path(tempfile.mkdtemp(prefix=f"pgpool-{name}-"))
        self.config = self.base / "pgbouncer.ini"
        self.userlist = self.base / "userlist.txt"
        self.logfile = self.base / "pgbouncer.log"
        self.pidfile = self.base / "pgbouncer.pid"
        self.port = free_port()
        self.server = (server_host, server_port)
        self.settings: dict[str, str] = {
            "listen_addr": "127.0.0.1",
            "listen_port": str(self.port),
            "unix_socket_dir": "",  # no socket: TCP on 127.0.0.1 only
            "auth_type": "trust",
            "auth_file": str(self.userlist),
            "admin_users": "postgres",
            "stats_users": "postgres",
            "pool_mode": pool_mode,
            "default_pool_size": str(default_pool_size),
            "min_pool_size": "0",
            "reserve_pool_size": "0",
            "max_client_conn": "500",
            # Transaction pooling never runs it; empty makes that explicit.
            "server_reset_query": "",
            "ignore_startup_parameters": "extra_float_digits",
            "logfile": str(self.logfile),
            "pidfile": str(self.pidfile),
            "log_connections": "0",
            "log_disconnections": "0",
        }
        self.settings.update(settings or {})
        self._proc: subprocess.Popen[bytes] | None = None

    # -- files -----------------------------------------------------------------

    def _write_files(self) -> None:
        host, port = self.server
        lines = ["[databases]", f"* = host={host} port={port}", "", "[pgbouncer]"]
        lines += [f"{key} = {value}" for key, value in self.settings.items()]
        self.config.write_text("\n".join(lines) + "\n")
        self.userlist.write_text("".join(f'"{user}" ""\n' for user in USERS))
        if os.geteuid() == 0:
            self.base.chmod(0o755)
            for path in (self.base, self.config, self.userlist):
                shutil.chown(path, SERVER_USER, SERVER_USER)

    # -- process control ---------------------------------------------------------

    def start(self, timeout: float = 30) -> None:
        """Start in the foreground and wait until the admin console answers."""
        self._write_files()
        runner = ["runuser", "-u", SERVER_USER, "--"] if os.geteuid() == 0 else []
        with open(self.base / "stdout.log", "wb") as out:
            self._proc = subprocess.Popen([*runner, self.binary, str(self.config)], stdout=out,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            try:
                self.admin("SHOW VERSION")
            except Exception as exc:  # noqa: BLE001 - not up yet; keep the last reason
                last = exc
                time.sleep(0.05)
            else:
                return
        code = self._proc.poll()
        self.stop()
        why = f"exited with status {code}" if code is not None else f"did not answer within {timeout:g} s ({last})"
        raise RuntimeError(f"pgbouncer {why}; log:\n{self.log()}")

    def pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def running(self) -> bool:
        pid = self.pid()
        return pid is not None and _is_pgbouncer(pid, self.config)

    def stop(self) -> None:
        """SIGTERM (immediate shutdown) by pid, SIGKILL if it lingers; safe to call twice."""
        pid = self.pid()
        if pid is not None and _is_pgbouncer(pid, self.config):
            for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                deadline = time.monotonic() + grace
                while time.monotonic() < deadline and _is_pgbouncer(pid, self.config):
                    time.sleep(0.02)
                    if self._proc is not None:
                        self._proc.poll()  # reap it if it is our direct child
                if not _is_pgbouncer(pid, self.config):
                    break
        proc, self._proc = self._proc, None
        if proc is not None:
            # runuser (our child) ends with pgbouncer; if the pid file was never
            # written, runuser passes our SIGTERM on to it. Never wait forever.
            for action in (None, proc.terminate, proc.kill):
                if action is not None:
                    with contextlib.suppress(ProcessLookupError):
                        action()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    continue
                break

    def cleanup(self) -> None:
        """Stop it and remove its directory."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def log(self) -> str:
        parts = []
        for path in (self.base / "stdout.log", self.logfile):
            with contextlib.suppress(OSError):
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)

    # -- connecting ------------------------------------------------------------------

    def dsn(self, *, user: str = "postgres", dbname: str = "postgres", **extra: str | int) -> str:
        params: dict[str, str | int] = {"host": "127.0.0.1", "port": self.port, "dbname": dbname,
                                        "user": user, "sslmode": "disable", **extra}
        return " ".join(f"{k}={v}" for k, v in params.items())

    def admin(self, command: str) -> list[dict[str, Any]]:
        """Run a console command (``SHOW POOLS``...) and return its rows as dicts."""
        import psycopg2

        conn = psycopg2.connect(self.dsn(dbname="pgbouncer", connect_timeout=2))
        try:
            conn.autocommit = True  # the console knows no BEGIN
            with conn.cursor() as cur:
                cur.execute(command)
                if cur.description is None:
                    return []
                names = [col.name for col in cur.description]
                return [dict(zip(names, row)) for row in cur.fetchall()]
        finally:
            conn.close()
