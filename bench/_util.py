"""Shared helpers of the benchmark scripts: a database to run against, statistics, tables.

Nothing here measures anything. The scripts in ``bench/`` are run as files
(``python bench/micro.py``), so this module is imported as ``_util``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def repo_on_path() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def sigterm_as_exit() -> None:
    """Turn SIGTERM into ``SystemExit`` so every ``finally`` (and so every cleanup) runs."""

    def _exit(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)


def run_main(main: Any) -> None:
    """Run a script's ``main()``; Ctrl-C ends it (after every cleanup) with status 130, no traceback."""
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


@contextlib.contextmanager
def database(dsn: str | None) -> Iterator[str]:
    """Yield ``dsn``, or start a throwaway PostgreSQL (``tests/pgserver.py``) and yield its DSN."""
    if dsn:
        yield dsn
        return
    repo_on_path()
    from tests.pgserver import PgServer

    server = PgServer(ssl=False, name="bench")
    try:
        server.start()
        yield server.dsn()
    finally:
        server.cleanup()


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--dsn", help="PostgreSQL to use (default: start a throwaway one)")
    parser.add_argument("--quick", action="store_true", help="a fast smoke run: short rows, fewer rounds")
    parser.add_argument("--rounds", type=int, help="rounds of interleaved rows (median taken)")
    parser.add_argument("--out", type=Path, help="write <name>.md and <name>.json into this directory")
    return parser


# -- statistics ---------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio_median(values: Sequence[float], refs: Sequence[float]) -> float:
    """Median over rounds of value/ref, both taken in the same round (robust to drift)."""
    pairs = [v / r for v, r in zip(values, refs) if r and r == r and v == v]
    return median(pairs)


def rotated(items: Sequence[Any], by: int) -> list[Any]:
    """``items`` starting at position ``by``: each round runs the rows in a different order."""
    by %= max(len(items), 1)
    return [*items[by:], *items[:by]]


# -- reporting ----------------------------------------------------------------


def machine() -> str:
    """One line describing where the numbers come from."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = f", load {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return (f"{os.cpu_count()} x {cpu}, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}{load}")


def versions(*dists: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for dist in dists:
        with contextlib.suppress(PackageNotFoundError):
            found.append(f"{dist} {version(dist)}")
    return ", ".join(found)


def server_version(dsn: str) -> str:
    import psycopg2

    conn = psycopg2.connect(dsn)
    try:
        return f"PostgreSQL {conn.server_version // 10000}.{conn.server_version % 10000}"
    finally:
        conn.close()


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table; numbers right-aligned."""
    align = ["---" if i == 0 else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float, digits: int = 0) -> str:
    if value != value:  # NaN
        return "n/a"
    return f"{value:,.{digits}f}"


def fmt_ratio(value: float) -> str:
    if value != value:
        return "n/a"
    return f"{value:.2f}x" if value < 100 else f"{value:.0f}x"


def write_results(out: Path | None, name: str, markdown: str, data: dict[str, Any]) -> None:
    """Print the markdown; with ``--out`` also write ``<name>.md`` and ``<name>.json``."""
    print(markdown, flush=True)
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(markdown + "\n")
    (out / f"{name}.json").write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


# -- child processes ----------------------------------------------------------


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM a child we started (by its pid), then SIGKILL it if it lingers."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(5)


def wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            if check():
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


# -- WSGI request loops (micro.py's (d), profile_pool.py) -------------------------------


def start_response(status: str, headers: list[tuple[str, str]], exc_info: object = None) -> Any:
    return lambda data: None


def ok_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """The bare app: no database work."""
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]


def serve_once(app: Any, environ: dict[str, Any]) -> None:
    """What a server does with one request: call, iterate the body, close it."""
    body = app(environ, start_response)
    for _chunk in body:
        pass
    close = getattr(body, "close", None)
    if close is not None:
        close()


def loop_wsgi(app: Any, environ: dict[str, Any], n: int) -> int:
    """``n`` requests, a fresh copy of ``environ`` each; nanoseconds taken."""
    copy = environ.copy
    start = time.perf_counter_ns()
    for _ in range(n):
        serve_once(app, copy())
    return time.perf_counter_ns() - start
