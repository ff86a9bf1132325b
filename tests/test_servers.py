"""The middleware under real servers: gunicorn, uWSGI (pyuwsgi) and waitress (SPEC D, F5).

Each case starts the server as a subprocess on 127.0.0.1 with
tests/serverapp.py (which queries through the pool while it is imported),
sends a burst of concurrent verified echo requests (tests/loadgen.py), and
checks every answer: no errors, no crossed answers, each answer served on a
connection the serving worker opened itself, every worker serving. Where the
app is loaded in a pre-forking master (gunicorn ``--preload``, uWSGI without
``lazy-apps``) the master must hold no PostgreSQL connection once the workers
serve: counted on the server (``pg_stat_activity``) and in the master's own
file descriptors (/proc).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.loadgen import LoadReport, fetch, get, run_load
from tests.pgserver import PgServer, free_port
from tests.serverctl import HOST, Server, running, tcp_connections_to

pytestmark = pytest.mark.servers

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
APP = "tests.serverapp:application"
MAX_SIZE = 3  # per worker; below the threads/greenlets of the waiting cases
REQUESTS = 2000
CLIENTS = 16


@dataclass(frozen=True)
class Case:
    """One server configuration and what to expect of it."""

    server: str  # gunicorn, uwsgi or waitress
    args: tuple[str, ...] = ()
    workers: int = 2  # worker processes (not used for waitress: one process)
    prefork: bool = False  # the app is imported, and queries, in the master before the fork
    waits: bool = False  # more concurrent requests per worker than max_size: checkouts must wait
    recycle: bool = False  # workers are replaced during the burst
    hup: bool = False  # SIGHUP to the master when half the burst is answered
    gevent: bool = False
    min_size: int = 0
    ssl: bool = False  # sslmode=require: a shared socket would fail with "decryption failed or bad record mac"
    sleep: float = 0.0  # seconds of pg_sleep per request, so requests overlap
    fork_check: str = "wipeonfork"  # or "pid": the fallback where the kernel refuses the page


def command(case: Case, port: int) -> list[str]:
    if case.server == "gunicorn":
        return [str(BIN / "gunicorn"), "-c", "tests/gunicorn_conf.py", "--bind", f"{HOST}:{port}",
                "--workers", str(case.workers), "--graceful-timeout", "5", *case.args, APP]
    if case.server == "uwsgi":
        # The pyuwsgi wheel's console script; `python -m pyuwsgi` does not work.
        return [str(BIN / "uwsgi"), "--http-socket", f"{HOST}:{port}", "--master", "--processes",
                str(case.workers), "--module", APP, "--need-app", "--die-on-term", "--disable-logging", *case.args]
    if case.server == "waitress":
        return [str(BIN / "waitress-serve"), f"--listen={HOST}:{port}", *case.args, APP]
    raise ValueError(case.server)


CASES = [
    pytest.param(Case("gunicorn"), id="gunicorn-sync"),
    pytest.param(Case("gunicorn", ("--preload",), prefork=True), id="gunicorn-sync-preload"),
    # min_size: each process tops its pool up as it returns connections; the master must not.
    pytest.param(Case("gunicorn", ("--preload",), prefork=True, min_size=2), id="gunicorn-sync-preload-min_size"),
    pytest.param(Case("gunicorn", ("--preload",), prefork=True, ssl=True), id="gunicorn-sync-preload-ssl"),
    pytest.param(Case("gunicorn", ("--threads", "8"), waits=True, sleep=0.005), id="gunicorn-gthread"),
    pytest.param(Case("gunicorn", ("--threads", "8", "--preload"), prefork=True, waits=True, sleep=0.005),
                 id="gunicorn-gthread-preload"),
    pytest.param(Case("gunicorn", ("--worker-class", "gevent", "--worker-connections", "64"),
                      waits=True, gevent=True, sleep=0.005), id="gunicorn-gevent"),
    pytest.param(Case("gunicorn", ("--worker-class", "gevent", "--worker-connections", "64", "--preload"),
                      prefork=True, waits=True, gevent=True, sleep=0.005), id="gunicorn-gevent-preload"),
    pytest.param(Case("gunicorn", ("--max-requests", "50", "--max-requests-jitter", "20"), recycle=True, hup=True),
                 id="gunicorn-max_requests-hup"),
    pytest.param(Case("gunicorn", ("--max-requests", "50", "--max-requests-jitter", "20", "--preload"),
                      prefork=True, recycle=True, hup=True), id="gunicorn-max_requests-hup-preload"),
    pytest.param(Case("uwsgi", prefork=True), id="uwsgi-processes"),
    pytest.param(Case("uwsgi", prefork=True, min_size=2), id="uwsgi-processes-min_size"),
    pytest.param(Case("uwsgi", prefork=True, ssl=True), id="uwsgi-processes-ssl"),
    # With these flags uWSGI runs Python's at-fork hooks too (gunicorn's situation).
    pytest.param(Case("uwsgi", ("--py-call-uwsgi-fork-hooks", "--py-call-osafterfork"), prefork=True),
                 id="uwsgi-processes-fork-hooks"),
    pytest.param(Case("uwsgi", ("--threads", "8"), prefork=True, waits=True, sleep=0.005), id="uwsgi-threads"),
    pytest.param(Case("uwsgi", ("--lazy-apps",)), id="uwsgi-lazy-apps"),
    # uWSGI respawns on its master's one-second cycle: stagger the workers so one serves while the
    # other is replaced; recycling needs --min-worker-lifetime 0; no 2-second "forkbomb" pause.
    pytest.param(Case("uwsgi", ("--max-requests", "150", "--max-requests-delta", "50", "--min-worker-lifetime", "0",
                                "--forkbomb-delay", "0"), prefork=True, recycle=True), id="uwsgi-max-requests"),
    pytest.param(Case("waitress", ("--threads=8",), workers=0, waits=True, sleep=0.005), id="waitress"),
    # The same fork cases with the fork mark's fallback, the pid comparison.
    pytest.param(Case("gunicorn", ("--preload",), prefork=True, fork_check="pid"), id="gunicorn-sync-preload-pid"),
    pytest.param(Case("uwsgi", prefork=True, fork_check="pid"), id="uwsgi-processes-pid"),
    pytest.param(Case("uwsgi", ("--lazy-apps",), fork_check="pid"), id="uwsgi-lazy-apps-pid"),
]


def server_env(pg: PgServer, min_size: int = 0, ssl: bool = False, fork_check: str = "wipeonfork") -> dict[str, str]:
    """The environment of a server: the DSN in DATABASE_URL, no stray libpq variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG") and k != "DATABASE_URL"}
    env.update(DATABASE_URL=pg.dsn(sslmode="require") if ssl else pg.dsn(), PYTHONPATH=str(ROOT),
               SERVERAPP_MAX_SIZE=str(MAX_SIZE), SERVERAPP_MIN_SIZE=str(min_size), PYTHONUNBUFFERED="1",
               PGPOOL_TEST_FORK_CHECK=fork_check)
    return env


def pool_sessions(pg: PgServer) -> dict[int, int]:
    """Process pid -> server sessions it opened, from the application_name the pool sets."""
    rows = pg.execute("SELECT application_name, count(*) FROM pg_stat_activity "
                      "WHERE application_name LIKE 'pgpool_wsgi pid=%%' GROUP BY 1")
    return {int(str(name).rsplit("=", 1)[1]): int(str(n)) for name, n in rows}


@dataclass
class Observed:
    report: LoadReport
    master: int
    workers: list[int]  # children of the master at the end of the burst
    sessions: dict[int, int]  # pid -> pg_stat_activity rows, at the end of the burst
    master_sockets: int  # TCP sockets from the master to PostgreSQL's port (/proc)
    log: str = ""  # the server's output (master and workers), shutdown included
    seconds: float = 0.0


def observe(server: Server, report: LoadReport, pg: PgServer) -> Observed:
    """What the server's processes hold once the burst is over (the server still runs)."""
    return Observed(report=report, master=server.pid, workers=server.children(), sessions=pool_sessions(pg),
                    master_sockets=tcp_connections_to(server.pid, pg.port))


def run_case(case: Case, pg: PgServer, log_path: Path) -> Observed:
    port = free_port()
    started = time.monotonic()
    env = server_env(pg, case.min_size, case.ssl, case.fork_check)
    with running(command(case, port), port=port, env=env, log_path=log_path, cwd=ROOT) as server:
        midway = (lambda: server.signal(signal.SIGHUP)) if case.hup else None
        report = run_load(HOST, port, total=REQUESTS, concurrency=CLIENTS, params={"sleep": case.sleep},
                          timeout=30, deadline=150, midway=midway)
        seen = observe(server, report, pg)
    seen.seconds = time.monotonic() - started
    seen.log = log_path.read_text(errors="replace")
    return seen


def assert_all_right(seen: Observed, total: int) -> None:
    """Every request answered with its own token, no error, nothing alarming in the server's output."""
    report = seen.report
    tail = "\n".join(seen.log.splitlines()[-30:])
    assert report.unsent == 0, f"{report.summary()}\n{tail}"
    assert not report.errors, f"{report.errors.most_common(5)}\n{tail}"
    assert not report.crossed, [(a.token, a.data) for a in report.crossed[:5]]
    assert len(report.ok) == total
    assert "Traceback" not in seen.log, seen.log[-3000:]


def assert_master_holds_nothing(seen: Observed) -> None:
    """F5, counted on the server (application_name) and in the master's descriptors."""
    assert seen.sessions.get(seen.master, 0) == 0, seen.sessions
    assert seen.master_sockets == 0


def assert_workers(case: Case, seen: Observed) -> None:
    """Only workers served; every worker served (unless they were being replaced)."""
    served = set(seen.report.per_pid())
    if case.server == "waitress":
        assert served == {seen.master}
    elif case.recycle:
        assert seen.master not in served
        assert len(served) > case.workers, f"workers were not recycled: {seen.report.per_pid()}"
    else:
        assert len(seen.workers) == case.workers, seen.workers
        assert served == set(seen.workers), f"served by {seen.report.per_pid()}, workers {seen.workers}"


def assert_connections(case: Case, seen: Observed) -> None:
    report = seen.report
    # F1: each answer came over a connection the serving process opened itself.
    foreign = [a.data for a in report.ok if a.data is not None and a.data["owner"] != a.data["pid"]]
    assert not foreign, foreign[:5]
    # No process holds more than max_size connections, nor opened more over the burst.
    assert all(n <= MAX_SIZE for n in seen.sessions.values()), seen.sessions
    assert all(len(b) <= MAX_SIZE for b in report.by_pid("backend").values()), report.by_pid("backend")
    assert report.values("ssl") == {case.ssl}
    if case.min_size:
        workers = set(seen.workers) if case.server != "waitress" else {seen.master}
        assert all(seen.sessions.get(pid, 0) >= case.min_size for pid in workers), seen.sessions
    if case.server != "waitress":
        assert_master_holds_nothing(seen)


def assert_loading(case: Case, seen: Observed) -> None:
    """Where the app was imported (and queried), and what the pool saw of the fork."""
    report = seen.report
    if case.prefork:
        assert report.values("loaded_by") == {seen.master}
        assert report.values("fork_resets") == {1}
    else:
        assert all(a.data is not None and a.data["loaded_by"] == a.data["pid"] for a in report.ok)
        assert report.values("fork_resets") == {0}


@pytest.mark.parametrize("case", CASES)
def test_burst_is_served_right(pg: PgServer, tmp_path: Path, case: Case) -> None:
    seen = run_case(case, pg, tmp_path / "server.log")
    report = seen.report
    print(f"\n{report.summary()}; {seen.seconds:.1f} s with start and stop")

    assert_all_right(seen, REQUESTS)
    assert_workers(case, seen)
    assert_connections(case, seen)
    assert_loading(case, seen)
    if case.waits:
        assert max(report.values("waiting")) > 0, "no checkout ever waited: the case tests nothing"
    assert report.values("fork_check") == {case.fork_check}
    expected_callback = "psycogreen.gevent" if case.gevent else None
    assert report.values("wait_callback") == {expected_callback}
    if case.hup:
        assert "Hang up" in seen.log


DEMO_COMMANDS = [
    pytest.param(lambda port: [str(BIN / "gunicorn"), "-c", "demo/gunicorn.conf.py", "--bind", f"{HOST}:{port}"],
                 id="gunicorn-demo-conf"),
    pytest.param(lambda port: [str(BIN / "uwsgi"), "--set-ph", f"demo_port={port}", "--ini", "demo/uwsgi.ini"],
                 id="uwsgi-demo-ini"),
]


@pytest.mark.parametrize("make_command", DEMO_COMMANDS)
def test_demo_deployment_files(pg: PgServer, tmp_path: Path, make_command: Callable[[int], list[str]]) -> None:
    """demo/gunicorn.conf.py and demo/uwsgi.ini as shipped: 4 pre-forked workers, the paste pipeline."""
    port = free_port()
    env = dict(server_env(pg), DEMO_FILE=str(tmp_path / "big.bin"), DEMO_FILE_MB="1")
    log_path = tmp_path / "server.log"
    started = time.monotonic()
    with running(make_command(port), port=port, env=env, log_path=log_path, cwd=ROOT) as server:
        report = run_load(HOST, port, total=1000, concurrency=CLIENTS, timeout=30, deadline=150)
        seen = observe(server, report, pg)
        status, headers, body = fetch(HOST, port, "/download", timeout=30)
        cpu_status, cpu_body = get(HOST, port, "/cpu?n=100", timeout=30)
    seen.log = log_path.read_text(errors="replace")
    print(f"\n{report.summary()}; {time.monotonic() - started:.1f} s with start and stop")

    assert_all_right(seen, 1000)
    assert len(seen.workers) == 4 and set(report.per_pid()) == set(seen.workers)
    assert_master_holds_nothing(seen)
    # /download hands its connection back before streaming; /cpu never takes one.
    assert status == 200 and hashlib.sha256(body).hexdigest() == headers["x-sha256"]
    assert headers["x-pool-in-use"] == "0"
    assert cpu_status == 200 and json.loads(cpu_body)["had_connection"] is False


CAPACITY_CASES = [
    pytest.param("gunicorn", ("--preload",), "3 gunicorn workers", id="gunicorn-preload"),
    pytest.param("gunicorn", (), "3 gunicorn workers", id="gunicorn"),
    pytest.param("uwsgi", (), "3 uWSGI workers", id="uwsgi-processes"),
]


@pytest.mark.parametrize(("server", "args", "who"), CAPACITY_CASES)
def test_capacity_warning_names_the_deployment_once(pg: PgServer, tmp_path: Path, server: str,
                                                    args: tuple[str, ...], who: str) -> None:
    """3 workers x max_size 120 = 360 connections, more than the server's 300 minus reserved."""
    available = int(str(pg.execute("SELECT current_setting('max_connections')::int"
                                   " - current_setting('superuser_reserved_connections')::int")[0][0]))
    case = Case(server, args, workers=3)
    port = free_port()
    env = dict(server_env(pg), SERVERAPP_MAX_SIZE="120")
    log_path = tmp_path / "server.log"
    with running(command(case, port), port=port, env=env, log_path=log_path, cwd=ROOT):
        report = run_load(HOST, port, total=200, concurrency=CLIENTS, timeout=30, deadline=60)
    assert not report.errors and len(report.ok) == 200
    log = log_path.read_text(errors="replace")
    lines = [line for line in log.splitlines() if "this deployment may open" in line]
    assert len(lines) == 1, log[-3000:]
    assert f"open 360 connections ({who} x max_size 120)" in lines[0]
    assert f"the server accepts {available}" in lines[0]
