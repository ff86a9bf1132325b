"""A primary and a streaming standby for failover tests.

:class:`Standby` is a :class:`~tests.pgserver.PgServer` whose data directory
comes from ``pg_basebackup -R`` of a running primary instead of ``initdb``:
``standby.signal`` and ``primary_conninfo`` are written by ``-R``, so it
starts as a hot standby streaming from the primary over 127.0.0.1 (the
primary's ``pg_hba.conf`` trusts replication there). :meth:`Standby.promote`
makes it the new primary. :func:`multi_host_dsn` builds the libpq connection
string that follows the read-write server among several.
"""

from __future__ import annotations

import time

from tests.pgserver import PgServer


class Standby(PgServer):
    """A hot standby of ``primary`` on its own port and data directory.

    ::

        standby = Standby(primary)
        try:
            standby.start()
            standby.wait_streaming()
            ...
            primary.stop()
            standby.promote()
        finally:
            standby.cleanup()
    """

    def __init__(self, primary: PgServer, *, name: str = "standby") -> None:
        # The primary's settings (ssl too: its certificate is in the copied data directory).
        super().__init__(ssl=False, conf=dict(primary.conf), name=name)
        self.primary = primary

    def init(self) -> None:
        """Copy the primary's data directory with ``pg_basebackup -R`` (run as the server user)."""
        self._prepare_dirs()
        self._run(str(self.bindir / "pg_basebackup"), "--pgdata", str(self.datadir), "--write-recovery-conf",
                  "--wal-method=stream", "--checkpoint=fast", "--no-sync", "--host=127.0.0.1",
                  f"--port={self.primary.port}", "--username=postgres", timeout=180)
        self._initialised = True

    def in_recovery(self) -> bool:
        return bool(self.execute("SELECT pg_is_in_recovery()")[0][0])

    def wait_streaming(self, timeout: float = 60) -> None:
        """Wait until the primary reports this standby's WAL receiver as streaming."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.primary.execute("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'")
            if rows[0][0]:
                return
            time.sleep(0.05)
        raise RuntimeError(f"standby on port {self.port} not streaming after {timeout:g} s")

    def promote(self, timeout: float = 60) -> None:
        """``pg_ctl promote`` and wait until it accepts writes."""
        self._run(str(self.bindir / "pg_ctl"), "promote", "-w", "-t", str(int(timeout)), "-D", str(self.datadir),
                  timeout=timeout + 10)


def multi_host_dsn(*servers: PgServer, target_session_attrs: str = "read-write", **extra: str | int) -> str:
    """``host=h1,h2 port=p1,p2 target_session_attrs=read-write ...``: libpq picks the writable one."""
    params: dict[str, str | int] = {
        "host": ",".join("127.0.0.1" for _ in servers),
        "port": ",".join(str(s.port) for s in servers),
        "target_session_attrs": target_session_attrs,
        "dbname": "postgres",
        "user": "postgres",
        "sslmode": "disable",
        **extra,
    }
    return " ".join(f"{k}={v}" for k, v in params.items())
