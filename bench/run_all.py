"""``make bench``: every benchmark against one throwaway PostgreSQL, then the chart.

Writes into ``bench/results/`` (``--quick``: ``bench/results/quick/``, not
kept in git): ``micro.md``/``.json``, ``e2e.md``/``.json``, ``bench.png`` and,
when a micro-benchmark target was missed (or with ``--profile always``),
``profile.md``: where the time of a checkout + return goes.

Run: ``.venv/bin/python bench/run_all.py [--quick] [--profile auto|always|never]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import _util

BENCH = Path(__file__).resolve().parent


def run_script(name: str, *args: str) -> None:
    """Run ``bench/<name>`` in its own process; stop it if we are stopped."""
    cmd = [sys.executable, str(BENCH / name), *args]
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    proc = subprocess.Popen(cmd)
    try:
        if proc.wait() != 0:
            raise SystemExit(f"{name} failed (exit status {proc.returncode})")
    except KeyboardInterrupt:
        # Ctrl-C reached the child too: let it stop its own servers first.
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(60)
        raise
    finally:
        _util.stop_process(proc, timeout=30)


def missed_micro_target(out: Path) -> bool:
    data = json.loads((out / "micro.json").read_text())
    return not all(met for _what, _got, _bar, met in data["targets"])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a fast smoke run of everything")
    parser.add_argument("--profile", choices=("auto", "always", "never"), default="auto",
                        help="profile the pool's checkout + return: when a micro target is missed (auto)")
    parser.add_argument("--out", type=Path, help="results directory (default bench/results[/quick])")
    args = parser.parse_args(argv)
    _util.sigterm_as_exit()
    out = args.out or (_util.RESULTS / "quick" if args.quick else _util.RESULTS)
    quick = ["--quick"] if args.quick else []
    started = time.monotonic()
    with _util.database(None) as dsn:
        run_script("micro.py", "--dsn", dsn, "--out", str(out), *quick)
        run_script("e2e.py", "--dsn", dsn, "--out", str(out), *quick)
        if args.profile == "always" or (args.profile == "auto" and missed_micro_target(out)):
            run_script("profile_pool.py", "--dsn", dsn, "--out", str(out), "--seconds", "1" if args.quick else "3")
    run_script("chart.py", "--results", str(out))
    print(f"\nresults in {out} ({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    _util.run_main(main)
