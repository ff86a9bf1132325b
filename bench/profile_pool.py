"""Where the time of one ``getconn()`` + ``putconn()`` goes, in nanoseconds.

Three views of the same hot path (an idle connection is there; no query):

1. ns/op of ``pool.putconn(pool.getconn())`` for each ``check``, next to
   psycopg2's ``ThreadedConnectionPool``;
2. per line of ``pgpool_wsgi`` (needs ``py-spy``: ``pip install py-spy``):
   the loop runs under ``py-spy record`` and each sample is charged to the
   innermost ``pgpool_wsgi`` line on its stack (C calls such as
   ``os.getpid()`` or a lock count for the line that makes them); a line's
   ns = its share of the samples in the loop x the loop's ns/op;
3. per function (cProfile, which adds its own cost per call: compare
   functions with each other, not with 1.);
4. the price of the primitives the hot path is made of (``timeit``, best of 5);
5. what-if: the same operation with ``pgpool_wsgi.pool._getpid`` swapped
   for a C callable returning the pid (what a fork check without a system
   call would save), measured alternately with the unpatched one;
6. inside gunicorn workers (sync, then gthread) serving
   ``bench/e2e_app.py``'s echo under ``wrk`` load (needs py-spy and wrk):
   the samples whose innermost frame is the middleware or the pool (not the
   app's query), so the µs per request the library costs in a real server;
   and the garbage collector's runs and time per request (``gc.callbacks``
   in the workers), for the middleware and for the ceiling.

py-spy samples wall-clock time: on a busy machine a line that makes a
system call (``os.getpid()``, ``poll()``) also collects the time the
process waited for a CPU after it, so trust 4. and 5. for those lines.

View 2 also covers one request through ``PgPoolMiddleware`` (defaults; the
app does not query), called directly as a WSGI server would.

Run: ``.venv/bin/python bench/profile_pool.py [--dsn DSN] [--seconds 3] [--out bench/results]``
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import linecache
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
import timeit
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import _util

CHECKS = ("none", "auto")
WSGI = "wsgi"  # the middleware, defaults, a request that checks out and does not query
LOOPS = ("loop", "loop_wsgi")
PACKAGE = f"{os.sep}pgpool_wsgi{os.sep}"


def make_pool(dsn: str, check: str) -> Any:
    from pgpool_wsgi import ConnectionPool

    pool = ConnectionPool(dsn, max_size=4, check=check)
    pool.putconn(pool.getconn())  # one idle connection: every checkout below is the fast path
    return pool


def ns_per_op(stmt: str, env: dict[str, Any], repeat: int = 5) -> float:
    """Best of ``repeat`` timeit runs of about 0.2 s each, in ns per execution."""
    timer = timeit.Timer(stmt, globals=env)
    n, _ = timer.autorange()
    return min(timer.repeat(repeat, n)) / n * 1e9


# -- 1. the whole operation ---------------------------------------------------------


def whole(dsn: str) -> list[tuple[str, float]]:
    from psycopg2.pool import ThreadedConnectionPool

    rows = []
    for check in CHECKS:
        pool = make_pool(dsn, check)
        try:
            rows.append((f"pgpool_wsgi check={check}", ns_per_op("pool.putconn(pool.getconn())", {"pool": pool})))
        finally:
            pool.close()
    pg2 = ThreadedConnectionPool(1, 1, dsn)
    try:
        rows.append(("psycopg2 ThreadedConnectionPool", ns_per_op("pool.putconn(pool.getconn())", {"pool": pg2})))
    finally:
        pg2.closeall()
    return rows


# -- 2. per line, sampled by py-spy ----------------------------------------------------


def loop(pool: Any, seconds: float) -> float:
    """Checkout + return for about ``seconds``; the ns per op."""
    get, put = pool.getconn, pool.putconn
    n = 0
    start = time.perf_counter_ns()
    deadline = start + int(seconds * 1e9)
    while time.perf_counter_ns() < deadline:
        for _ in range(1000):
            put(get())
        n += 1000
    return (time.perf_counter_ns() - start) / n


def loop_wsgi(app: Any, seconds: float) -> float:
    """One request after another (fresh environ, body iterated and closed) for ``seconds``; ns per request."""
    import wsgiref.util

    environ: dict[str, Any] = {"PATH_INFO": "/x", "REQUEST_METHOD": "GET"}
    wsgiref.util.setup_testing_defaults(environ)
    n = spent = 0
    while spent < seconds * 1e9:
        spent += _util.loop_wsgi(app, environ, 1000)
        n += 1000
    return spent / n


def child(dsn: str, mode: str, seconds: float, result: Path) -> None:
    """The process py-spy samples: the loop, then its ns/op into ``result``."""
    if mode == WSGI:
        from pgpool_wsgi import PgPoolMiddleware

        app = PgPoolMiddleware(_util.ok_app, dsn=dsn, max_size=4)
        try:
            result.write_text(str(loop_wsgi(app, seconds)))
        finally:
            app.pool.close()
        return
    pool = make_pool(dsn, mode)
    try:
        result.write_text(str(loop(pool, seconds)))
    finally:
        pool.close()


def _frame(frame: str) -> tuple[str, str, int]:
    # "function (path/to/file.py:123)"
    name, _, where = frame.rpartition(" (")
    path, _, line = where.rstrip(")").rpartition(":")
    return name, path, int(line) if line.isdigit() else 0


def charge_lines(raw: str) -> tuple[Counter[tuple[str, int, str]], int]:
    """Samples per innermost pgpool_wsgi line, and the samples taken inside ``loop``."""
    lines: Counter[tuple[str, int, str]] = Counter()
    in_loop = 0
    for record in raw.splitlines():
        stack, _, count = record.rpartition(" ")
        if not count.isdigit():
            continue
        frames = [_frame(f) for f in stack.split(";")]
        if not any(name in LOOPS and path.endswith("profile_pool.py") for name, path, _ in frames):
            continue
        in_loop += int(count)
        ours = [(path, line, name) for name, path, line in frames if PACKAGE in path or path.startswith("pgpool_wsgi")]
        key = ours[-1] if ours else ("(the benchmark loop itself)", 0, "loop")
        lines[key] += int(count)
    return lines, in_loop


def sampled(dsn: str, mode: str, seconds: float, spy: str) -> tuple[float, list[tuple[str, float, float]]]:
    """(where, share of samples, ns per op) per line, most expensive first."""
    with tempfile.TemporaryDirectory(prefix="pgpool-profile-") as tmp:
        raw, result = Path(tmp) / "raw.txt", Path(tmp) / "ns.txt"
        cmd = [spy, "record", "--nonblocking", "--rate", "2000", "--format", "raw", "--output", str(raw), "--",
               sys.executable, __file__, "--child", mode, "--dsn", dsn, "--seconds", str(seconds),
               "--result", str(result)]
        subprocess.run(cmd, check=True, capture_output=True, timeout=seconds + 120)
        ns = float(result.read_text())
        lines, total = charge_lines(raw.read_text())
    rows = []
    for (path, line, name), count in lines.most_common():
        source = linecache.getline(path, line).strip() if line else ""
        where = f"{Path(path).name}:{line} {name}: {source}" if line else path
        rows.append((where, count / total, count / total * ns))
    return ns, rows


# -- 3. per function, cProfile --------------------------------------------------------


def profiled(dsn: str, check: str, ops: int = 200_000) -> list[tuple[str, int, float, float]]:
    """(function, calls per op, own ns per op, cumulative ns per op) under cProfile."""
    pool = make_pool(dsn, check)
    profile = cProfile.Profile()
    try:
        get, put = pool.getconn, pool.putconn
        profile.enable()
        for _ in range(ops):
            put(get())
        profile.disable()
    finally:
        pool.close()
    stats = pstats.Stats(profile)
    rows = []
    for (path, line, name), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if ncalls < ops:  # once-only set-up, not the hot path
            continue
        where = f"{Path(path).name}:{line} {name}" if line else name
        rows.append((where, round(ncalls / ops), tottime / ops * 1e9, cumtime / ops * 1e9))
    rows.sort(key=lambda r: -r[2])
    return rows


# -- 4. primitives ----------------------------------------------------------------------


PRIMITIVES = (
    ("os.getpid()", "getpid()"),
    ("time.monotonic()", "monotonic()"),
    ("with lock: pass", "with lock: pass"),
    ("lock.acquire(); lock.release()", "acquire(); release()"),
    ("conn.closed", "conn.closed"),
    ("conn.get_transaction_status()", "conn.get_transaction_status()"),
    ("conn.info.transaction_status", "conn.info.transaction_status"),
    ("conn.autocommit", "conn.autocommit"),
    ("conn.isolation_level", "conn.isolation_level"),
    ("conn.readonly + conn.deferrable", "conn.readonly; conn.deferrable"),
    ("conn.fileno()", "conn.fileno()"),
    ("poller.poll(0) (one poll() syscall)", "poller.poll(0)"),
    ("select.poll() + register()", "p = poll(); p.register(fd, 1)"),
    ("dict.get(conn)", "slots.get(conn)"),
    ("list.pop() + list.append()", "idle.append(idle.pop())"),
    ("method call, no arguments", "obj.method()"),
)


class _Obj:
    def method(self) -> None:
        return None


def primitives(dsn: str) -> list[tuple[str, float]]:
    import select
    import threading

    import psycopg2

    conn = psycopg2.connect(dsn)
    lock = threading.Lock()
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    env = {"getpid": os.getpid, "monotonic": time.monotonic, "lock": lock, "acquire": lock.acquire,
           "release": lock.release, "conn": conn, "poller": poller, "poll": select.poll, "fd": conn.fileno(),
           "slots": {conn: 1}, "idle": [1], "obj": _Obj()}
    try:
        return [(label, ns_per_op(stmt, env)) for label, stmt in PRIMITIVES]
    finally:
        conn.close()


# -- 5. what-if -------------------------------------------------------------------------


@contextlib.contextmanager
def cached_pid() -> Iterator[bool]:
    """Swap the pool's ``_getpid`` for a C callable returning our pid; yield whether it could."""
    import itertools

    from pgpool_wsgi import pool as pool_module

    saved = getattr(pool_module, "_getpid", None)
    if saved is None:
        yield False
        return
    pool_module._getpid = itertools.repeat(os.getpid()).__next__  # type: ignore[attr-defined]
    try:
        yield True
    finally:
        pool_module._getpid = saved  # type: ignore[attr-defined]


def what_if(dsn: str, rounds: int = 5) -> list[tuple[str, float, float]]:
    """(case, ns/op as is, ns/op with the pid cached): best of ``rounds`` alternating runs."""
    from pgpool_wsgi import PgPoolMiddleware

    cases: list[tuple[str, str, dict[str, Any], Any]] = []
    for check in CHECKS:
        pool = make_pool(dsn, check)
        cases.append((f"getconn() + putconn(), check={check}", "pool.putconn(pool.getconn())", {"pool": pool},
                      pool))
    import wsgiref.util

    app = PgPoolMiddleware(_util.ok_app, dsn=dsn, max_size=4)
    environ: dict[str, Any] = {"PATH_INFO": "/x", "REQUEST_METHOD": "GET"}
    wsgiref.util.setup_testing_defaults(environ)
    cases.append(("one request through the middleware (defaults), no query", "request(app, environ.copy())",
                  {"request": _util.serve_once, "app": app, "environ": environ}, app.pool))
    rows = []
    try:
        for label, stmt, env, _pool in cases:
            plain, patched = [], []
            for _ in range(rounds):
                plain.append(ns_per_op(stmt, env, repeat=1))
                with cached_pid() as swapped:
                    patched.append(ns_per_op(stmt, env, repeat=1) if swapped else float("nan"))
            rows.append((label, min(plain), min(patched)))
    finally:
        for *_rest, pool in cases:
            pool.close()
    return rows


# -- 6. inside a gunicorn worker ------------------------------------------------------


def _children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


def own_samples(raw: str) -> tuple[int, Counter[str]]:
    """All samples, and those whose innermost pgpool_wsgi frame has no app frame below it, per line."""
    total = 0
    ours: Counter[str] = Counter()
    for record in raw.splitlines():
        stack, _, count = record.rpartition(" ")
        if not count.isdigit():
            continue
        total += int(count)
        frames = stack.split(";")
        at = [i for i, f in enumerate(frames) if PACKAGE.lstrip(os.sep) in f]
        if at and not any("e2e_app.py" in f for f in frames[at[-1]:]):
            ours[frames[at[-1]]] += int(count)
    return total, ours


def _sample_worker(spy: str, server: Any, connections: int, raw: Path, seconds: float) -> dict[str, float]:
    """wrk load on ``server`` while py-spy samples its first worker (all threads) into ``raw``."""
    import e2e

    worker = _children(server.proc.pid)[0]
    sampler = subprocess.Popen([spy, "record", "--nonblocking", "--rate", "1000", "--format", "raw",
                                "--output", str(raw), "--pid", str(worker), "--duration", str(int(seconds) + 2)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        load = e2e.wrk(server.url(e2e.ECHO), connections, max(int(seconds), 1))
        sampler.wait(seconds + 60)
    finally:
        _util.stop_process(sampler)
    return load


def _gc_rows(directory: Path) -> list[list[str]]:
    """One row per variant: requests served, collector runs per generation, µs of collection per request."""
    rows = []
    for variant in ("pgpool", "ceiling"):
        files = [json.loads(f.read_text()) for f in directory.glob(f"gc-{variant}-*.json")]
        requests = sum(f["requests"][0] for f in files)
        runs = [sum(f["runs"][g] for f in files) for g in range(3)]
        spent = sum(sum(f["seconds"]) for f in files)
        rows.append([variant, _util.fmt(requests), " / ".join(str(int(r)) for r in runs), _util.fmt(spent * 1e3, 1),
                     _util.fmt(spent * 1e6 / max(requests, 1), 2)])
    return rows


def in_worker(dsn: str, seconds: float, spy: str, worker_type: str) -> str:
    """py-spy on a gunicorn worker of the middleware under wrk load; the collector's cost beside the ceiling's."""
    import e2e

    if shutil.which("wrk") is None:
        return f"### 6. Inside a gunicorn {worker_type} worker: skipped, wrk is not installed"
    with tempfile.TemporaryDirectory(prefix="pgpool-profile-") as tmp:
        gc_dir = Path(tmp) / "gc"
        gc_dir.mkdir()
        os.chmod(tmp, 0o777)
        os.chmod(gc_dir, 0o777)
        servers = {}
        try:
            for variant in ("pgpool", "ceiling"):
                servers[variant] = e2e.start_gunicorn(variant, worker_type, dsn, Path(tmp),
                                                      {"BENCH_GC_STATS": str(gc_dir)})
            connections = e2e.WORKERS * (e2e.GTHREADS if worker_type == "gthread" else 1) * 2
            for server in servers.values():
                e2e.check_ready(server)
                e2e.wrk(server.url(e2e.ECHO), connections, 1)
            raw = Path(tmp) / "raw.txt"
            load = _sample_worker(spy, servers["pgpool"], connections, raw, seconds)
            ceiling = e2e.wrk(servers["ceiling"].url(e2e.ECHO), connections, max(int(seconds), 1))
        finally:
            for server in servers.values():
                _util.stop_process(server.proc)
        total, ours = own_samples(raw.read_text())
        gc_rows = _gc_rows(gc_dir)
    # 1000 samples a second: a sample stands for 1000 µs of one thread's time.
    requests = load["rps"] * max(int(seconds), 1) / e2e.WORKERS
    own_us = sum(ours.values()) * 1000 / requests
    rows = [[f"`{_source(where)}`", _util.fmt(count * 1000 / requests, 2)] for where, count in ours.most_common(12)]
    return (f"### 6. Inside a gunicorn {worker_type} worker ({e2e.WORKERS} workers, wrk {connections} connections): "
            f"middleware {load['rps']:,.0f} req/s, ceiling {ceiling['rps']:,.0f} req/s\n\n"
            f"Samples whose innermost frame is the middleware or the pool: {sum(ours.values())} of {total} "
            f"(not idle) in one worker, about {own_us:.1f} µs per request it served. py-spy does not see the "
            "garbage collector, which runs inside whatever line allocates; its cost is counted by gc.callbacks "
            "in every worker of both servers (warm-up included) in the second table.\n\n"
            + _util.md_table(["innermost pgpool_wsgi frame", "≈ µs/request"], rows) + "\n\n"
            + _util.md_table(["variant", "requests", "collections gen0 / gen1 / gen2", "ms collecting",
                              "µs collecting per request"], gc_rows))


def _source(frame: str) -> str:
    name, path, line = _frame(frame)
    text = linecache.getline(str(_util.ROOT / path), line).strip()
    return f"{Path(path).name}:{line} {name}: {text}"


# -- report -------------------------------------------------------------------------------


def report(dsn: str, seconds: float) -> str:
    header = f"Machine: {_util.machine()}. {_util.server_version(dsn)}; {_util.versions('pgpool_wsgi')}."
    parts = [f"## Profile of pgpool_wsgi's checkout + return\n\n{header}"]
    parts.append("### 1. The whole operation (timeit, best of 5)\n\n" + _util.md_table(
        ["", "ns/op"], [[label, _util.fmt(ns)] for label, ns in whole(dsn)]))
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    for mode in (*CHECKS, WSGI):
        if spy is None:
            parts.append("### 2. Per line: py-spy not installed (`pip install py-spy`)")
            break
        ns, rows = sampled(dsn, mode, seconds, spy)
        what = ("one request through PgPoolMiddleware (defaults), no query" if mode == WSGI
                else f"getconn() + putconn(), check={mode}")
        parts.append(f"### 2. Per line: {what}; {ns:,.0f} ns/op while sampled\n\n" + _util.md_table(
            ["line (innermost pgpool_wsgi frame)", "share", "ns/op"],
            [[f"`{where}`", f"{share:.1%}", _util.fmt(ns)] for where, share, ns in rows if share >= 0.005]))
    for check in CHECKS:
        rows3 = profiled(dsn, check)
        parts.append(f"### 3. Per function, check={check} (cProfile; inflated by its own per-call cost)\n\n"
                     + _util.md_table(["function", "calls/op", "own ns/op", "cumulative ns/op"],
                                      [[f"`{w}`", str(c), _util.fmt(t), _util.fmt(cum)] for w, c, t, cum in rows3]))
    parts.append("### 4. Primitives (timeit, best of 5)\n\n" + _util.md_table(
        ["", "ns"], [[f"`{label}`", _util.fmt(ns, 1)] for label, ns in primitives(dsn)]))
    parts.append("### 5. What-if: `pgpool_wsgi.pool._getpid` replaced by a cached pid (best of 5, alternating)\n\n"
                 + _util.md_table(["", "ns/op as is", "ns/op, pid cached", "saved, ns"],
                                  [[label, _util.fmt(a), _util.fmt(b), _util.fmt(a - b)]
                                   for label, a, b in what_if(dsn)]))
    if spy is not None:
        parts += [in_worker(dsn, seconds, spy, worker_type) for worker_type in ("sync", "gthread")]
    return "\n\n".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", help="PostgreSQL to use (default: start a throwaway one)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds of sampling per check mode")
    parser.add_argument("--out", type=Path, help="write profile.md into this directory")
    parser.add_argument("--child", choices=(*CHECKS, WSGI), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.dsn, args.child, args.seconds, args.result)
        return
    _util.sigterm_as_exit()
    with _util.database(args.dsn) as dsn:
        markdown = report(dsn, args.seconds)
    print(markdown)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile.md").write_text(markdown + "\n")


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        _util.run_main(main)
