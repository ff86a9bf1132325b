"""The torture test (issue 10): seeded, bounded chaos against the real server, then every invariant.

Each run is a fresh process running tests/torture.py (threads with a tiny
switch interval, injected BaseExceptions, pg_terminate_backend, forks with
threads mid-query; or gevent greenlets with real gevent.Timeouts). In
``make test`` the seeds are fixed and the whole file takes about 30 s;
``make torture SECONDS=600`` draws fresh seeds until the time is spent.
A failure names the seed: rerun it with PGPOOL_TORTURE_SEEDS=<seed>.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

RUNNER = Path(__file__).with_name("torture.py")
FIXED = [("threads", 1, 5.0), ("threads", 2, 5.0), ("threads", 3, 5.0), ("gevent", 4, 4.0)]


def run_one(dsn: str, mode: str, seed: int, seconds: float) -> dict[str, object]:
    args = json.dumps({"dsn": dsn, "seed": seed, "seconds": seconds, "mode": mode})
    try:
        done = subprocess.run([sys.executable, str(RUNNER), args], capture_output=True, text=True,
                              timeout=seconds + 120)
    except subprocess.TimeoutExpired as exc:  # subprocess.run killed it
        pytest.fail(f"{mode} seed {seed}: the run hung ({exc})")
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0 and lines, f"{mode} seed {seed}: exit {done.returncode}\n{done.stderr[-4000:]}"
    report: dict[str, object] = json.loads(lines[-1])
    assert report["ok"], f"{mode} seed {seed} failed: {report['failures']}\n{done.stderr[-4000:]}"
    return report


def plan() -> list[tuple[str, int, float]]:
    seeds = os.environ.get("PGPOOL_TORTURE_SEEDS")
    if seeds:
        return [(mode, int(seed), 10.0) for seed in seeds.split(",") for mode in ("threads", "gevent")]
    return FIXED


@pytest.mark.parametrize(("mode", "seed", "seconds"), plan(), ids=lambda v: str(v))
def test_torture(pg, mode, seed, seconds):
    report = run_one(pg.dsn(), mode, seed, seconds)
    numbers = report["numbers"]
    assert isinstance(numbers, dict) and numbers.get("ops", 0) > 0
    if mode == "threads":
        assert numbers.get("forks", 0) > 0


def test_torture_for_long(pg):
    """``make torture SECONDS=600``: fresh seeds until the time is spent."""
    budget = float(os.environ.get("PGPOOL_TORTURE_SECONDS", "0"))
    if not budget:
        pytest.skip("set PGPOOL_TORTURE_SECONDS (make torture SECONDS=600)")
    deadline = time.monotonic() + budget
    runs = 0
    while time.monotonic() < deadline:
        seed = random.SystemRandom().randrange(1, 10**9)
        mode = random.choice(["threads", "threads", "gevent"])
        print(f"torture: {mode} seed {seed}", flush=True)
        run_one(pg.dsn(), mode, seed, min(15.0, max(2.0, deadline - time.monotonic())))
        runs += 1
    print(f"torture: {runs} runs passed", flush=True)
