"""End-to-end benchmark: a ``SELECT %s`` echo endpoint under gunicorn, loaded by ``wrk``.

For each worker type (``sync``, and ``gthread`` with 4 threads; 2 workers
each) every variant of ``bench/e2e_app.py`` runs in its own gunicorn, all of
them started before the first measurement and stopped at the end. Each
round loads every row once, in a different order each round; a cell is the
median over rounds, a ratio the median of per-round ratios.

Load: ``wrk`` (one thread) with ``Connection: close`` on every request, so
that gthread workers share the load (with keep-alive a worker that accepts
the client's connections first can keep all of them) and sync workers
(which close after each response anyway) are driven the same way. Each
request is so a TCP connect, one HTTP exchange and a close.

Rows: the middleware (``transaction=autocommit``, default check; and two
diagnostic variants: ``check=none``, and connections opened in autocommit
with the default ``transaction=manual``, so nothing is switched per
request); the ceiling (a hand-written app using connections opened in gunicorn's
``post_fork``, one per worker thread); psycopg2's ``ThreadedConnectionPool``,
psycopg_pool and a SQLAlchemy engine's pool (``raw_connection()``), each
built in ``post_fork``; ``psycopg2.connect()`` per request, straight to
PostgreSQL and through PgBouncer in transaction mode. Then the middleware's
own cost over HTTP, all three in the middleware variant's processes: the
app called without the middleware, an ``exclude_paths`` path, and a path
that checks out without querying.

Run: ``.venv/bin/python bench/e2e.py [--quick] [--dsn DSN] [--out bench/results]``.
Needs ``wrk``; the PgBouncer row needs ``pgbouncer`` (both Debian packages).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _util

BENCH = Path(__file__).resolve().parent
WORKERS = 2
GTHREADS = 4
ECHO = "/q?v=4242"
VARIANTS = ("pgpool", "pgpool_none", "pgpool_ac", "ceiling", "psycopg2", "psycopg_pool", "sqlalchemy", "connect",
            "pgbouncer")


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    variant: str
    path: str


ROWS = (
    Row("pgpool", "pgpool_wsgi middleware (transaction=autocommit)", "pgpool", ECHO),
    Row("pgpool_none", "pgpool_wsgi middleware, check=none (diagnostic)", "pgpool_none", ECHO),
    Row("pgpool_ac", "pgpool_wsgi middleware, connections opened in autocommit, transaction=manual (diagnostic)",
        "pgpool_ac", ECHO),
    Row("ceiling", "persistent connection per worker thread, opened in post_fork (ceiling)", "ceiling", ECHO),
    Row("psycopg2", "psycopg2 ThreadedConnectionPool, made in post_fork", "psycopg2", ECHO),
    Row("psycopg_pool", "psycopg_pool ConnectionPool (psycopg 3), made in post_fork", "psycopg_pool", ECHO),
    Row("sqlalchemy", "SQLAlchemy engine pool (raw_connection), made in post_fork", "sqlalchemy", ECHO),
    Row("connect", "connect per request", "connect", ECHO),
    Row("pgbouncer", "connect per request through PgBouncer (transaction mode)", "pgbouncer", ECHO),
)
OVERHEAD_ROWS = (
    Row("bare", "bare app, no middleware, no query", "pgpool", "/bare"),
    Row("excluded", "middleware, excluded path (exclude_paths)", "pgpool", "/static/x"),
    Row("checkout", "middleware, checkout without a query", "pgpool", "/noquery"),
)


# -- PgBouncer ------------------------------------------------------------------


@contextlib.contextmanager
def pgbouncer(dsn: str) -> Iterator[str | None]:
    """Yield a DSN through a PgBouncer in transaction mode (None without pgbouncer); stop it after."""
    from psycopg2.extensions import parse_dsn

    _util.repo_on_path()
    from tests.pgbouncer import PgBouncer

    params = parse_dsn(dsn)
    try:
        bouncer = PgBouncer(server_port=int(params["port"]), default_pool_size=WORKERS * GTHREADS,
                            settings={"max_client_conn": "1000"}, name="bench-bouncer")
    except RuntimeError as exc:  # not installed
        print(f"{exc}: skipping its row", file=sys.stderr)
        yield None
        return
    try:
        bouncer.start()
        yield bouncer.dsn(user=params.get("user", "postgres"), dbname=params.get("dbname", "postgres"))
    finally:
        bouncer.cleanup()


# -- gunicorn -------------------------------------------------------------------


@dataclass
class Server:
    variant: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def start_gunicorn(variant: str, worker: str, dsn: str, logdir: Path,
                   extra_env: dict[str, str] | None = None) -> Server:
    _util.repo_on_path()
    from tests.pgserver import free_port

    threads = GTHREADS if worker == "gthread" else 1
    port = free_port()
    env = {**os.environ, "BENCH_VARIANT": variant, "BENCH_DSN": dsn, "BENCH_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([str(BENCH), str(_util.ROOT)]), **(extra_env or {})}
    cmd = [sys.executable, "-m", "gunicorn", "-c", str(BENCH / "gunicorn_conf.py"), "-w", str(WORKERS),
           "-k", worker, "-b", f"127.0.0.1:{port}", "--log-level", "warning", "--graceful-timeout", "5"]
    if worker == "gthread":
        cmd += ["--threads", str(threads)]
    log = logdir / f"{worker}-{variant}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([*cmd, "e2e_app:app"], env=env, stdout=out, stderr=subprocess.STDOUT)
    return Server(variant, port, proc, log)


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as resp:
        body: bytes = resp.read()
        return body


def check_ready(server: Server) -> None:
    """Wait until it answers; then check the echo is the database's answer, from both workers."""
    def ready() -> bool:
        if server.proc.poll() is not None:
            raise RuntimeError(f"gunicorn ({server.variant}) exited:\n{server.log.read_text()[-3000:]}")
        return _get(server.url("/noquery")) == b"ok"

    _util.wait_until(ready, 60, f"gunicorn ({server.variant}) to answer")
    for i in range(8):
        got = _get(server.url(f"/q?v={i}"))
        if got != str(i).encode():
            raise RuntimeError(f"{server.variant}: /q?v={i} answered {got!r}")


@contextlib.contextmanager
def servers(worker: str, dsn: str, bouncer: str | None, variants: set[str]) -> Iterator[dict[str, Server]]:
    """The variants under gunicorn with this worker type; all stopped on the way out."""
    logdir = Path(tempfile.mkdtemp(prefix=f"pgpool-bench-{worker}-"))
    started: dict[str, Server] = {}
    try:
        for variant in VARIANTS:
            if variant not in variants or (variant == "pgbouncer" and bouncer is None):
                continue
            started[variant] = start_gunicorn(variant, worker, bouncer if variant == "pgbouncer" else dsn, logdir)
        for server in started.values():
            check_ready(server)
        yield started
    finally:
        for server in started.values():
            _util.stop_process(server.proc)
        shutil.rmtree(logdir, ignore_errors=True)


# -- wrk ------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def parse_wrk(output: str) -> dict[str, float]:
    """req/s, p50/p99 latency in ms and errors from ``wrk --latency`` output."""
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", output))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors += int(non2xx.group(1)) if non2xx else 0
    return {"rps": rps, "p50": _ms(p50.group(1)) if p50 else float("nan"),
            "p99": _ms(p99.group(1)) if p99 else float("nan"), "errors": float(errors)}


def wrk(url: str, connections: int, seconds: int) -> dict[str, float]:
    exe = shutil.which("wrk")
    if exe is None:
        raise SystemExit("wrk not found: apt-get install wrk (Debian/Ubuntu)")
    cmd = [exe, "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "10s",
           "-H", "Connection: close", url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=True)
    return parse_wrk(done.stdout)


# -- the run ----------------------------------------------------------------------


def run_worker(worker: str, dsn: str, bouncer: str | None, rounds: int, seconds: int,
               only: Sequence[str] = ()) -> dict[str, Any]:
    connections = WORKERS * (GTHREADS if worker == "gthread" else 1) * 2
    results: dict[str, list[dict[str, float]]] = {}
    wanted = [row for row in (*ROWS, *OVERHEAD_ROWS) if not only or row.key in only]
    with servers(worker, dsn, bouncer, {row.variant for row in wanted}) as up:
        rows = [row for row in wanted if row.variant in up]
        for row in rows:  # warm-up: every worker has opened its connections
            wrk(up[row.variant].url(row.path), connections, 1)
        for r in range(rounds):
            for row in _util.rotated(rows, r):
                results.setdefault(row.key, []).append(wrk(up[row.variant].url(row.path), connections, seconds))
            print(f"  {worker}: round {r + 1}/{rounds} done", flush=True)
    return {"connections": connections, "samples": results}


def _series(samples: dict[str, list[dict[str, float]]], key: str, field: str) -> list[float]:
    return [s[field] for s in samples.get(key, [])]


def worker_table(worker: str, run: dict[str, Any]) -> str:
    s = run["samples"]
    ceiling = _series(s, "ceiling", "rps")
    header = ["", "req/s", "p50 ms", "p99 ms", "vs ceiling", "errors"]
    rows = []
    for row in ROWS:
        if row.key not in s:
            continue
        rps = _series(s, row.key, "rps")
        rows.append([row.label, _util.fmt(_util.median(rps)), _util.fmt(_util.median(_series(s, row.key, "p50")), 2),
                     _util.fmt(_util.median(_series(s, row.key, "p99")), 2),
                     _util.fmt_ratio(_util.ratio_median(rps, ceiling)), _util.fmt(sum(_series(s, row.key, "errors")))])
    threads = f", {GTHREADS} threads each" if worker == "gthread" else ""
    return (f"### gunicorn {worker}, {WORKERS} workers{threads}; wrk {run['connections']} connections\n\n"
            + _util.md_table(header, rows))


def overhead_table(runs: dict[str, dict[str, Any]]) -> str:
    """Machine time per request (1e6 / req/s) above the bare app, per worker type."""
    rows = []
    for row in OVERHEAD_ROWS:
        cells = [row.label]
        for run in runs.values():
            s = run["samples"]
            us = [1e6 / v for v in _series(s, row.key, "rps")]
            bare = [1e6 / v for v in _series(s, "bare", "rps")]
            cells += [_util.fmt(_util.median(_series(s, row.key, "rps"))),
                      _util.fmt(_util.median([a - b for a, b in zip(us, bare)]), 1)]
        rows.append(cells)
    header = [""]
    for worker in runs:
        header += [f"{worker} req/s", f"{worker} µs above bare"]
    return ("### The middleware's own cost over HTTP (µs = 1e6 / req/s, machine time per request)\n\n"
            + _util.md_table(header, rows))


def targets(runs: dict[str, dict[str, Any]]) -> list[tuple[str, float, float, bool]]:
    checks = []
    for worker, run in runs.items():
        s = run["samples"]
        ours = _series(s, "pgpool", "rps")
        checks.append((f"{worker}: middleware vs ceiling", _util.ratio_median(ours, _series(s, "ceiling", "rps")),
                       0.97))
        for other in ("psycopg_pool", "sqlalchemy"):
            checks.append((f"{worker}: middleware vs {other}", _util.ratio_median(ours, _series(s, other, "rps")),
                           1.0))
    return [(what, got, bar, got >= bar) for what, got, bar in checks]


def report(runs: dict[str, dict[str, Any]], header: str, rounds: int, seconds: int) -> str:
    parts = [f"## End-to-end: gunicorn + wrk\n\n{header}\n\nMedian of {rounds} interleaved rounds of {seconds} s "
             "per row; \"vs ceiling\" is the median of per-round req/s ratios. Every request carries "
             "`Connection: close`."]
    parts += [worker_table(worker, run) for worker, run in runs.items()]
    parts.append(overhead_table(runs))
    parts.append("### Targets (same run)\n\n" + _util.md_table(
        ["target", "ratio", "bar", "met"],
        [[what, _util.fmt_ratio(got), f">= {bar:g}x", "yes" if ok else "**no**"]
         for what, got, bar, ok in targets(runs)]))
    return "\n\n".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
    parser = _util.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, help="seconds of load per row and round")
    parser.add_argument("--workers", default="sync,gthread", help="worker types, comma-separated")
    parser.add_argument("--rows", default="", help="only these rows (keys, comma-separated; default all)")
    args = parser.parse_args(argv)
    _util.sigterm_as_exit()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install wrk (Debian/Ubuntu)")
    rounds = args.rounds or (1 if args.quick else 3)
    seconds = args.seconds or (1 if args.quick else 5)
    with _util.database(args.dsn) as dsn, pgbouncer(dsn) as bouncer:
        header = (f"Machine: {_util.machine()}. {_util.server_version(dsn)} over TCP on 127.0.0.1; "
                  + _util.versions("pgpool_wsgi", "gunicorn", "psycopg2-binary", "psycopg", "psycopg-pool",
                                   "SQLAlchemy") + (", PgBouncer" if bouncer else ", no PgBouncer") + ".")
        only = [key for key in args.rows.split(",") if key]
        runs = {worker: run_worker(worker, dsn, bouncer, rounds, seconds, only)
                for worker in args.workers.split(",")}
    data = {"header": header, "rounds": rounds, "seconds": seconds, "runs": runs,
            "order": [row.key for row in (*ROWS, *OVERHEAD_ROWS)],
            "labels": {row.key: row.label for row in (*ROWS, *OVERHEAD_ROWS)}, "targets": targets(runs)}
    _util.write_results(args.out, "e2e", report(runs, header, rounds, seconds), data)


if __name__ == "__main__":
    _util.run_main(main)
