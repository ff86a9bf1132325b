"""``make demo``: the demo app under ``gunicorn --preload -w 4``, with pgpool_wsgi and with a naive pool.

1. Starts a throwaway PostgreSQL (tests/pgserver.py) and a ``demo`` database.
2. Runs ``demo.wsgi:application`` (demo/demo.ini: pgpool_wsgi) under gunicorn
   with demo/gunicorn.conf.py, sends a few thousand verified echo requests
   over 16 connections (tests/loadgen.py), visits the other pages, and reads
   each worker's pool stats from ``/_pool``.
3. Runs the same app as ``demo.naive:application`` (psycopg2's
   ThreadedConnectionPool made at import, before the fork) under the same
   load.
4. Prints both side by side and stops everything, always.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.loadgen import LoadReport, fetch, get, run_load  # noqa: E402
from tests.pgserver import PgServer, free_port  # noqa: E402
from tests.serverctl import HOST, Server, running, tcp_connections_to  # noqa: E402

BIN = Path(sys.executable).parent
REQUESTS = 3000
CLIENTS = 16
WORKERS = 4
CLIENT_TIMEOUT = 5.0  # a naive worker can hang for good inside execute()
LOAD_DEADLINE = 40.0


@dataclass
class Run:
    """One app under gunicorn: what the load saw and what we read around it."""

    title: str
    report: LoadReport
    master_connections: int
    seconds: float
    stats: dict[int, dict[str, Any]] = field(default_factory=dict)
    tour: list[str] = field(default_factory=list)


def worker_stats(port: int, workers: int, tries: int = 200) -> dict[int, dict[str, Any]]:
    """``GET /_pool`` until each worker has answered once (stats are per worker)."""
    found: dict[int, dict[str, Any]] = {}
    for _ in range(tries):
        status, body = get(HOST, port, "/_pool", timeout=CLIENT_TIMEOUT)
        if status == 200:
            stats = json.loads(body)
            found[stats["pid"]] = stats
        if len(found) >= workers:
            break
    return found


def tour(port: int) -> list[str]:
    """Visit the other pages once and say what each showed."""
    lines = []
    status, _, body = fetch(HOST, port, "/", timeout=30)
    first = body.decode(errors="replace").split("<p>")[1].split("</p>")[0] if b"<p>" in body else body[:80]
    lines.append(f"GET /              {status}  {first}")
    status, _, body = fetch(HOST, port, "/cpu?n=20000", timeout=30)
    cpu = json.loads(body) if status == 200 else {}
    lines.append(f"GET /cpu?n=20000   {status}  20000 sha256 rounds; connection checked out: "
                 f"{cpu.get('had_connection')} (exclude_paths)")
    status, headers, body = fetch(HOST, port, "/download", timeout=30)
    ok = hashlib.sha256(body).hexdigest() == headers.get("x-sha256")
    lines.append(f"GET /download      {status}  {len(body) >> 20} MiB streamed, sha256 "
                 f"{'verified' if ok else 'WRONG'}; pool in use while streaming: {headers.get('x-pool-in-use')} "
                 "(released before the body)")
    return lines


def gunicorn(app: str, port: int) -> list[str]:
    return [str(BIN / "gunicorn"), "-c", "demo/gunicorn.conf.py", "--bind", f"{HOST}:{port}",
            "--workers", str(WORKERS), "--preload", "--timeout", "10", app]


def serve_and_load(title: str, app: str, env: dict[str, str], pg: PgServer, logs: Path) -> Run:
    port = free_port()
    print(f"  {title}: gunicorn --preload -w {WORKERS} {app}; {REQUESTS} requests over {CLIENTS} connections ...",
          flush=True)
    started = time.monotonic()
    server: Server
    with running(gunicorn(app, port), port=port, env=env, log_path=logs / f"{app}.log", cwd=ROOT,
                 ready_timeout=60, ready_path="/cpu") as server:
        report = run_load(HOST, port, total=REQUESTS, concurrency=CLIENTS, timeout=CLIENT_TIMEOUT,
                          deadline=LOAD_DEADLINE)
        run = Run(title, report, tcp_connections_to(server.pid, pg.port), 0.0)
        if app == "demo.wsgi:application":
            run.tour = tour(port)
            run.stats = worker_stats(port, WORKERS)
    run.seconds = time.monotonic() - started
    return run


def side_by_side(good: Run, naive: Run) -> str:
    def row(label: str, a: object, b: object) -> str:
        return f"  {label:<44}{a!s:>14}{b!s:>16}"

    def worked(r: Run) -> int:
        return len(r.report.ok) - len(r.report.crossed)

    lines = [row("", "pgpool_wsgi", "naive pool"),
             row("requests answered", f"{good.report.sent}/{REQUESTS}", f"{naive.report.sent}/{REQUESTS}"),
             row("right answers", worked(good), worked(naive)),
             row("crossed answers (another request's rows)", len(good.report.crossed), len(naive.report.crossed)),
             row("errors (500s, timeouts)", sum(good.report.errors.values()), sum(naive.report.errors.values())),
             row("worker pids that answered", len(good.report.per_pid()), len(naive.report.per_pid())),
             row("master's connections to PostgreSQL", good.master_connections, naive.master_connections),
             row("seconds (start, load, stop)", f"{good.seconds:.1f}", f"{naive.seconds:.1f}")]
    return "\n".join(lines)


def timing_line(run: Run) -> str:
    """When the wrong answers came, counted from the start of the load."""
    bad = sorted(a.at for a in run.report.answers if a.error is not None or a in run.report.crossed)
    if not bad:
        return "    no wrong answers"
    early = sum(1 for t in bad if t < 1.0)
    return (f"    {len(bad)} wrong answers; the first {bad[0]:.2f} s after the load began, "
            f"{early} of them within its first second")


def errors_block(run: Run) -> list[str]:
    # libpq's messages arrive cut short at various lengths: count a cut one with the whole.
    grouped: Counter[str] = Counter()
    for text, n in sorted(run.report.errors.items(), key=lambda item: -len(item[0])):
        whole = next((known for known in grouped if known.startswith(text)), text)
        grouped[whole] += n
    lines = [f"    {n:>5}  {text}" for text, n in grouped.most_common(6)]
    for a in run.report.crossed[:3]:
        lines.append(f"    crossed: sent token {a.token!r}, got {a.data.get('token') if a.data else None!r} "
                     f"(worker {a.data.get('pid') if a.data else '?'})")
    return lines


def stats_block(run: Run) -> list[str]:
    per_pid = run.report.per_pid()
    lines = [f"    {'worker pid':>10} {'requests':>9} {'checkouts':>10} {'connects':>9} {'fork_resets':>12} "
             f"{'size':>5} {'idle':>5} {'discarded':>10}"]
    for pid, s in sorted(run.stats.items()):
        lines.append(f"    {pid:>10} {per_pid.get(pid, 0):>9} {s['checkouts']:>10} {s['connects']:>9} "
                     f"{s['fork_resets']:>12} {s['size']:>5} {s['idle']:>5} {s['discarded']:>10}")
    return lines


def main() -> int:
    began = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="pgpool-demo-logs-"))
    keep_logs = bool(os.environ.get("DEMO_KEEP_LOGS"))
    pg = PgServer(ssl=False, name="demo")
    try:
        print("starting a throwaway PostgreSQL ...", flush=True)
        pg.start()
        pg.execute("CREATE DATABASE demo OWNER app")
        version = pg.execute("SHOW server_version")[0][0]
        print(f"  PostgreSQL {version} on {HOST}:{pg.port}, database 'demo', role 'app'")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(DATABASE_URL=pg.dsn(user="app", dbname="demo"), PYTHONPATH=str(ROOT),
                   DEMO_FILE=str(work / "big.bin"), PYTHONUNBUFFERED="1")
        good = serve_and_load("pgpool_wsgi", "demo.wsgi:application", env, pg, work)
        naive = serve_and_load("naive pool", "demo.naive:application", env, pg, work)
    finally:
        pg.cleanup()
        if keep_logs:
            (work / "big.bin").unlink(missing_ok=True)
        else:
            shutil.rmtree(work, ignore_errors=True)

    print("\nwith pgpool_wsgi (demo/demo.ini):")
    print(f"  {good.report.summary()}")
    for line in good.tour:
        print(f"  {line}")
    print("  pool stats of each worker (GET /_pool):")
    print("\n".join(stats_block(good)))
    if good.report.errors or good.report.crossed:
        print("\n".join(errors_block(good)))
    print("\nwith psycopg2's ThreadedConnectionPool made at import (demo/naive.py):")
    print(f"  {naive.report.summary()}")
    print("\n".join(errors_block(naive)) or "    no errors this time")
    print(timing_line(naive))
    print("\nside by side (gunicorn --preload, 4 sync workers, one query at import, "
          f"{CLIENTS} concurrent verified clients):")
    print(side_by_side(good, naive))
    where = f"server logs are in {work}" if keep_logs else "DEMO_KEEP_LOGS=1 keeps the servers' logs"
    print(f"\ndemo done in {time.monotonic() - began:.0f} s; {where}")
    right = not good.report.errors and not good.report.crossed and good.report.sent == REQUESTS
    return 0 if right else 1


if __name__ == "__main__":
    sys.exit(main())
