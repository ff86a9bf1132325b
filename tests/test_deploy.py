"""What the process model tells the pool, under the real servers (pgpool_wsgi/_deploy.py)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from tests.loadgen import get
from tests.pgserver import PgServer, free_port
from tests.serverctl import running

CHECKOUTS = 20  # tests/uwsgi_extras.py
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.mark.servers
def test_uwsgi_mule_and_spooler_keep_their_connections(pg: PgServer, tmp_path: Path) -> None:
    """A mule and a spooler have worker_id() 0 like the master, but are not it: they pool normally."""
    results = tmp_path / "results"
    spool = tmp_path / "spool"
    results.mkdir()
    spool.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG") and k != "DATABASE_URL"}
    env.update(DATABASE_URL=pg.dsn(), PYTHONPATH=str(ROOT), EXTRAS_RESULTS=str(results), PYTHONUNBUFFERED="1")
    port = free_port()
    argv = [str(BIN / "uwsgi"), "--http-socket", f"127.0.0.1:{port}", "--master", "--processes", "1",
            "--module", "tests.uwsgi_extras:application", "--need-app", "--die-on-term",
            "--mule=tests/uwsgi_mule.py", "--spooler", str(spool), "--spooler-frequency", "1"]
    with running(argv, port=port, env=env, log_path=tmp_path / "uwsgi.log", cwd=ROOT, ready_path="/") as server:
        assert get("127.0.0.1", port, "/spool", timeout=10)[0] == 200
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all((results / f"{r}.json").exists() for r in ("mule", "spooler")):
            time.sleep(0.1)
        found = {r: json.loads((results / f"{r}.json").read_text())
                 for r in ("mule", "spooler") if (results / f"{r}.json").exists()}
        assert set(found) == {"mule", "spooler"}, server.log_tail()
        for role, stats in found.items():
            assert stats["role_pid"] != server.pid, role
            # One connection, kept and reused: not closed at every return as in the master.
            assert (role, stats["checkouts"], stats["connects"], stats["size"]) == (role, CHECKOUTS, 1, 1)
