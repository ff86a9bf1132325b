"""A throwaway PostgreSQL cluster for tests, the demo and the benchmarks.

``PgServer`` runs ``initdb`` into a temporary directory and starts
``postgres`` on a free 127.0.0.1 port below 32768 plus a private unix socket,
with ``fsync=off``.  PostgreSQL refuses to run as root, so when euid is 0 the
cluster is created and run as the ``postgres`` user (``runuser``) and the
directories are handed to that user.

Roles made by :meth:`PgServer.start`:

* ``postgres`` - superuser, trusted on the socket and on 127.0.0.1;
* ``app`` - a plain login role, trusted the same way;
* ``pwuser`` - must authenticate with a password (scram) over TCP.
"""

from __future__ import annotations

import contextlib
import glob
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SERVER_USER = "postgres"
PASSWORD_USER = "pwuser"
PASSWORD = "s3cr3t-Pa55word"

HBA = f"""\
local   all          all                          trust
local   replication  all                          trust
host    all          {PASSWORD_USER}     127.0.0.1/32   scram-sha-256
host    all          all          127.0.0.1/32   trust
host    replication  all          127.0.0.1/32   trust
"""


def find_pg_bin() -> Path:
    """Directory holding initdb/pg_ctl/postgres: PATH, then Debian's layout."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if candidates:
        return Path(candidates[-1]).parent
    raise RuntimeError(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found on "
        "PATH or in /usr/lib/postgresql/*/bin. Install them, e.g. on Debian/Ubuntu: "
        "sudo apt-get install postgresql"
    )


def free_port(low: int = 20000, high: int = 32000) -> int:
    """A free 127.0.0.1 port below the ephemeral range (see SPEC notes)."""
    for _ in range(200):
        port = random.randint(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found below 32768")


def _as_server_user() -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", SERVER_USER, "--"]
    return []


class PgServer:
    """One throwaway cluster; ``start()`` it, ``stop()`` it, ``cleanup()`` it."""

    def __init__(self, *, ssl: bool = True, conf: dict[str, str] | None = None,
                 base_dir: str | None = None, name: str = "pg") -> None:
        self.bindir = find_pg_bin()
        self.base = Path(base_dir or tempfile.mkdtemp(prefix=f"pgpool-{name}-"))
        self.datadir = self.base / "data"
        self.sockdir = self.base / "sock"
        self.logfile = self.base / "server.log"
        self.port = free_port()
        self.ssl = ssl
        self.conf = {
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "300",
            "shared_buffers": "32MB",
            "listen_addresses": "127.0.0.1",
            "log_min_messages": "warning",
            "wal_level": "replica",
            "max_wal_senders": "5",
        }
        self.conf.update(conf or {})
        self._initialised = False

    # -- process control -------------------------------------------------

    def _run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*_as_server_user(), *args], check=check, timeout=timeout,
                              capture_output=True, text=True)

    def _prepare_dirs(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.sockdir.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            self.base.chmod(0o755)
            shutil.chown(self.base, SERVER_USER, SERVER_USER)
            shutil.chown(self.sockdir, SERVER_USER, SERVER_USER)
        self.sockdir.chmod(0o777)

    def init(self) -> None:
        self._prepare_dirs()
        self._run(str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", "postgres",
                  "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync")
        (self.datadir / "pg_hba.conf").write_text(HBA)
        if self.ssl:
            self._make_cert()
        self._initialised = True

    def _make_cert(self) -> None:
        crt, key = self.datadir / "server.crt", self.datadir / "server.key"
        subprocess.run(["openssl", "req", "-new", "-x509", "-days", "3", "-nodes",
                        "-subj", "/CN=127.0.0.1", "-newkey", "rsa:2048",
                        "-out", str(crt), "-keyout", str(key)],
                       check=True, capture_output=True, timeout=60)
        key.chmod(0o600)
        if os.geteuid() == 0:
            for f in (crt, key):
                shutil.chown(f, SERVER_USER, SERVER_USER)
        self.conf["ssl"] = "on"

    def _options(self) -> str:
        opts = [f"-p {self.port}", f"-k {self.sockdir}"]
        opts += [f"-c {k}={v}" for k, v in self.conf.items()]
        return " ".join(opts)

    def start(self, timeout: float = 60) -> None:
        if not self._initialised:
            self.init()
        self._run(str(self.bindir / "pg_ctl"), "start", "-w", "-t", str(int(timeout)),
                  "-D", str(self.datadir), "-l", str(self.logfile), "-o", self._options(),
                  timeout=timeout + 10)
        self._ensure_roles()

    def stop(self, mode: str = "fast") -> None:
        if not self.running():
            return
        done = self._run(str(self.bindir / "pg_ctl"), "stop", "-w", "-t", "60", "-m", mode,
                         "-D", str(self.datadir), check=False, timeout=80)
        if done.returncode != 0 and self.running():
            self._kill_postmaster()

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def pid(self) -> int | None:
        pidfile = self.datadir / "postmaster.pid"
        try:
            return int(pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def running(self) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def _kill_postmaster(self) -> None:
        pid = self.pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGQUIT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.running():
            time.sleep(0.05)
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def cleanup(self) -> None:
        """Stop the server (if running) and remove its directory."""
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    # -- connecting ---------------------------------------------------------

    def dsn(self, *, user: str = "postgres", dbname: str = "postgres", tcp: bool = True,
            **extra: str | int) -> str:
        params: dict[str, str | int] = {"dbname": dbname, "user": user, "port": self.port}
        if tcp:
            params["host"] = "127.0.0.1"
            params.setdefault("sslmode", "disable")
        else:
            params["host"] = str(self.sockdir)
        params.update(extra)
        return " ".join(f"{k}={v}" for k, v in params.items())

    def url(self, *, user: str = "postgres", dbname: str = "postgres", password: str | None = None) -> str:
        auth = f"{user}:{password}" if password else user
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{dbname}?sslmode=disable"

    def execute(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        """Run one statement as superuser over the socket; return all rows."""
        import psycopg2

        conn = psycopg2.connect(self.dsn(tcp=False))
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql, params or None)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def backend_alive(self, backend_pid: int) -> bool:
        rows = self.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (backend_pid,))
        return bool(rows[0][0])

    def _ensure_roles(self) -> None:
        self.execute(
            "DO $$ BEGIN "
            "IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'app') THEN "
            "CREATE ROLE app LOGIN; END IF; "
            f"IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{PASSWORD_USER}') THEN "
            f"CREATE ROLE {PASSWORD_USER} LOGIN PASSWORD '{PASSWORD}'; END IF; "
            "END $$"
        )
