"""Run as a script by test_torture.py: one pool, many threads (or greenlets), chaos, then checks.

    python torture.py '{"dsn": ..., "seed": 1, "seconds": 8, "mode": "threads"|"gevent"}'

Seeded and bounded. Threads run with a tiny switch interval; BaseExceptions
are injected at the pool's blocking call sites; backends are killed with
pg_terminate_backend; the main thread forks (os.fork and a C-level fork)
while workers are mid-query, each child under an alarm. The gevent mode
uses real gevent.Timeouts instead of injection and does not fork. After
quiescence it checks everything issue 10 lists and prints one JSON object:
{"ok": bool, "failures": [...], "numbers": {...}}.
"""

from __future__ import annotations

import json
import sys

ARGS = json.loads(sys.argv[1])
if ARGS["mode"] == "gevent":
    from gevent import monkey

    monkey.patch_all()
    import psycogreen.gevent

    psycogreen.gevent.patch_psycopg()

import contextlib  # noqa: E402 - after gevent's patching
import ctypes  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Any  # noqa: E402

import psycopg2  # noqa: E402

from pgpool_wsgi import ConnectionPool, PoolClosed, PoolError, PoolTimeout, _conn  # noqa: E402
from pgpool_wsgi import _state as state_module  # noqa: E402
from pgpool_wsgi._dsn import Target  # noqa: E402

RUN: Run


class Injected(BaseException):
    """Stands for gevent.Timeout, KeyboardInterrupt, SystemExit, GreenletExit."""


class Run:
    def __init__(self, seed: int, seconds: float, mode: str, dsn: str) -> None:
        self.rng = random.Random(seed)
        self.seconds, self.mode, self.dsn = seconds, mode, dsn
        self.failures: list[str] = []
        self.numbers: dict[str, int] = {}
        self.killed: set[int] = set()  # backend pids we terminated (errors on them are expected)
        self.inject = 0.0  # probability per blocking call
        self.stop = threading.Event()
        self.gate = threading.Event()  # cleared around a C fork: workers pause between operations
        self.gate.set()
        self.guard = threading.Lock()

    def count(self, name: str) -> None:
        with self.guard:
            self.numbers[name] = self.numbers.get(name, 0) + 1

    def fail(self, what: str) -> None:
        with self.guard:
            self.failures.append(what)

    # -- fault injection at the pool's blocking call sites -----------------------

    def maybe(self, site: str) -> None:
        if self.inject and random.random() < self.inject:
            self.count(f"injected_{site}")
            raise Injected(site)

    def install(self) -> None:
        def wrap(module: Any, name: str, after: bool = False) -> None:
            real = getattr(module, name)

            def injected(*args: Any, **kwargs: Any) -> Any:
                if not after:
                    self.maybe(name)
                result = real(*args, **kwargs)
                if after:
                    self.maybe(name)
                return result

            setattr(module, name, injected)

        for name in ("reset", "ping", "examine"):
            wrap(_conn, name)
        wrap(_conn, "close", after=True)  # closed, then interrupted
        wrap(Target, "connect")
        real_connect = Target.connect

        def connect(target: Target, pid: int) -> Any:
            if self.inject and random.random() < self.inject / 2:
                self.count("injected_connect_error")
                raise psycopg2.OperationalError("injected connect failure")
            return real_connect(target, pid)

        Target.connect = connect  # type: ignore[method-assign]
        real_wait = state_module.Waiter.wait

        def wait(waiter: Any, timeout: float) -> bool:
            if self.inject and random.random() < self.inject:
                real_wait(waiter, min(timeout, random.random() * 0.01))
                self.count("injected_wait")
                raise Injected("wait")
            return bool(real_wait(waiter, timeout))

        state_module.Waiter.wait = wait  # type: ignore[method-assign]
        real_leave = state_module.State.leave_line

        def leave_line(state: Any, waiter: Any) -> object:
            # Under the lock: a waiter still in line while a slot sits idle is a lost wakeup.
            if waiter in state.waiters and state.idle:
                self.fail(f"a checkout waited while {len(state.idle)} connection(s) were idle")
            return real_leave(state, waiter)

        state_module.State.leave_line = leave_line  # type: ignore[method-assign]

    def configure(self, conn: Any) -> None:
        self.maybe("configure")
        if self.inject and random.random() < self.inject / 2:
            self.count("configure_error")
            raise psycopg2.ProgrammingError("injected configure failure")

    # -- what the application does -------------------------------------------------

    def use(self, conn: Any, rng: random.Random) -> None:
        token = f"t{rng.randrange(10**9)}"
        pid = conn.info.backend_pid
        try:
            if rng.random() < 0.1:
                conn.autocommit = not conn.autocommit  # the return restores it
            with conn.cursor() as cur:
                kind = rng.random()
                if kind < 0.15:
                    pause = 0.3 if kind < 0.03 else rng.random() * 0.02  # some are still running at a fork
                    cur.execute("SELECT pg_sleep(%s), %s::text", (pause, token))
                    got = cur.fetchone()[1]
                elif kind < 0.25:
                    cur.execute("DO $$BEGIN RAISE NOTICE 'n'; END$$")
                    cur.execute("SELECT %s::text", (token,))
                    got = cur.fetchone()[0]
                else:
                    cur.execute("SELECT %s::text", (token,))
                    got = cur.fetchone()[0]
                if kind > 0.9:
                    with contextlib.suppress(psycopg2.Error):
                        cur.execute("SELECT 1/0")  # left in error: the return rolls back
            if got != token:
                self.fail(f"crossed answer: sent {token}, got {got}")
        except psycopg2.Error as exc:
            self.count("query_errors")
            if pid not in self.killed:
                self.fail(f"a session we did not kill failed: {type(exc).__name__}: {exc}".strip())
            raise

    def op(self, pool: ConnectionPool, rng: random.Random) -> None:
        kind = rng.random()
        if kind < 0.05:
            pool.stats()
            pool.check_invariants()
            return
        if kind < 0.2:
            with pool.connection(timeout=rng.choice([0.05, 0.5, 2])) as conn:
                self.use(conn, rng)
            return
        conn = pool.getconn(timeout=rng.choice([0.05, 0.5, 2]))
        try:
            self.use(conn, rng)
            if rng.random() < 0.05:
                time.sleep(rng.random() * 0.05)  # a slow request
        except BaseException:
            pool.putconn(conn, discard=True)
            raise
        pool.putconn(conn, discard=rng.random() < 0.03)

    def worker(self, pool: ConnectionPool, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            self.gate.wait(5)
            try:
                if self.mode == "gevent":
                    import gevent

                    # A real request deadline: fires at whatever blocks (a wait, a query, a connect, a reset).
                    with gevent.Timeout(rng.random() * 0.03):
                        self.op(pool, rng)
                else:
                    self.op(pool, rng)
                self.count("ops")
            except Injected:
                self.count("interrupted")
            except PoolTimeout:
                self.count("pool_timeouts")
            except PoolClosed:
                self.count("pool_closed")
                return
            except PoolError:
                self.count("pool_errors")
                time.sleep(0.002)  # as a client would before retrying
            except psycopg2.Error:
                pass  # counted (and judged) in use()
            except BaseException as exc:  # noqa: BLE001 - any other escape is a finding
                if self.mode == "gevent" and type(exc).__name__ == "Timeout":
                    self.count("interrupted")
                    continue
                self.fail(f"unexpected {type(exc).__name__}: {traceback.format_exc()}")

    def ours(self, admin: Any) -> list[int]:
        with admin.cursor() as cur:
            cur.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                        (f"pgpool_wsgi pid={os.getpid()}",))
            return [r[0] for r in cur.fetchall()]

    def killer(self, admin: Any) -> None:
        rng = random.Random(self.rng.random())
        while not self.stop.wait(rng.random() * 0.2):
            pids = self.ours(admin)
            if pids:
                victim = rng.choice(pids)
                self.killed.add(victim)
                with admin.cursor() as cur:
                    cur.execute("SELECT pg_terminate_backend(%s)", (victim,))
                self.count("kills")


def child(run: Run, pool: ConnectionPool, lent: Any, rng: random.Random) -> None:
    signal.alarm(int(os.environ.get("TORTURE_CHILD_ALARM", "10")))  # default action: killed; a hang is a failure
    run.inject = 0.0  # the child checks the pool, it does not torture it
    code = 0
    try:
        if lent is not None:
            pool.putconn(lent)  # checked out before the fork
        conn = pool.getconn(timeout=5)
        with conn.cursor() as cur:
            cur.execute("SELECT 'child'::text")
            assert cur.fetchone()[0] == "child"
        pool.putconn(conn)
        pool.check_invariants()
        stats = pool.stats()
        assert stats["in_use"] == 0 and stats["fork_resets"] == 1, stats
    except BaseException:  # noqa: BLE001 - reported through the exit status
        traceback.print_exc()
        code = 1
    if rng.random() < 0.5:
        os._exit(code)
    sys.exit(code)


def c_fork() -> int:
    """fork() from C, with no Python at-fork hooks and no interpreter re-initialisation (as uWSGI does).

    CPython itself cannot survive that while another thread has asked for
    the GIL: the child then waits in drop_gil() for a thread that does not
    exist there (seen with gdb: drop_gil). Pausing the threads that run
    Python, a long switch interval and a sleep (re-taking the GIL clears
    the request) keep that CPython hazard out of the pool's test; threads
    inside a query stay there.
    PyDLL keeps the GIL across the call.
    """
    interval = sys.getswitchinterval()
    RUN.gate.clear()  # threads running Python pause; those inside a query stay there
    time.sleep(0.03)
    sys.setswitchinterval(1000.0)
    time.sleep(0.001)
    try:
        return int(ctypes.PyDLL(None).fork())
    finally:
        sys.setswitchinterval(interval)
        RUN.gate.set()


def fork_once(run: Run, pool: ConnectionPool, rng: random.Random) -> None:
    lent = None
    with contextlib.suppress(PoolError, Injected, psycopg2.Error):
        lent = pool.getconn(timeout=0.5) if rng.random() < 0.5 else None
    # PyDLL keeps the GIL across the call, as a fork from C code run by Python does.
    how = "ctypes" if rng.random() < 0.5 else "os"
    pid = c_fork() if how == "ctypes" else os.fork()
    if pid == 0:
        child(run, pool, lent, rng)
    if lent is not None:
        with contextlib.suppress(Injected):
            pool.putconn(lent)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.01)
    else:
        if os.environ.get("TORTURE_GDB"):
            subprocess.run(["gdb", "-p", str(pid), "-batch", "-ex", "bt"], stdout=sys.stderr, stderr=sys.stderr,
                           timeout=60)
        os.kill(pid, signal.SIGABRT)  # faulthandler prints where it hangs
        time.sleep(1)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        status = -1
    run.count("forks")
    if status != 0:
        run.fail(f"child {pid} ({how} fork) hung or failed (wait status {status})")


def fds() -> set[str]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out.add(f"{fd}->{os.readlink(f'/proc/self/fd/{fd}')}")
    return out


def spawn(mode: str, target: Any, *args: Any) -> Any:
    if mode == "gevent":
        import gevent

        return gevent.spawn(target, *args)
    t = threading.Thread(target=target, args=args, daemon=True)
    t.start()
    return t


def join(mode: str, tasks: list[Any], run: Run) -> None:
    for task in tasks:
        task.join(30)
        if (task.dead is False) if mode == "gevent" else task.is_alive():
            run.fail("a worker did not finish (hang)")


def chaos(run: Run, pool: ConnectionPool, admin: Any, seconds: float, forks: bool) -> None:
    rng = run.rng
    workers = [spawn(run.mode, run.worker, pool, rng.random()) for _ in range(rng.randint(3, 12))]
    killer = spawn(run.mode, run.killer, admin)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if run.mode == "gevent":
            import gevent

            with contextlib.suppress(BaseException):
                gevent.sleep(0.05)
            continue
        time.sleep(rng.random() * 0.3)
        if forks:
            fork_once(run, pool, rng)
    run.stop.set()
    join(run.mode, [*workers, killer], run)
    run.stop.clear()


def main() -> int:
    import faulthandler

    faulthandler.enable()  # inherited by children: a hung one shows its stacks on SIGABRT
    logging.getLogger("pgpool_wsgi").disabled = True  # see README: logging's locks and C forks
    global RUN
    run = RUN = Run(ARGS["seed"], ARGS["seconds"], ARGS["mode"], ARGS["dsn"])
    rng = run.rng
    if run.mode == "threads":
        sys.setswitchinterval(rng.choice([1e-6, 1e-5, 1e-4]))
    admin = psycopg2.connect(run.dsn, application_name="torture admin")
    admin.autocommit = True
    baseline = fds()
    max_size = rng.randint(1, 4)
    pool = ConnectionPool(run.dsn, max_size=max_size, min_size=rng.randint(0, max_size), timeout=1,
                          check=rng.choice(["auto", "auto", "ping", "none"]), ping_after=rng.choice([0, 1]),
                          max_lifetime=rng.choice([0, 0.5, 3]), max_idle=rng.choice([0, 0.3, 5]),
                          leak_timeout=rng.choice([0, 0.05]), configure=run.configure)
    run.install()
    run.inject = rng.choice([0.0, 0.02, 0.1])
    chaos(run, pool, admin, run.seconds, forks=run.mode == "threads")
    run.inject = 0.0
    time.sleep(1.2)  # past any connect backoff (at most 1 s)
    quiesced(run, pool, admin)
    run.inject = rng.choice([0.02, 0.1])
    closer = threading.Timer(rng.random() * 0.5, pool.close) if run.mode == "threads" else None
    if closer is not None:
        closer.start()  # close() races returns and top-ups
        chaos(run, pool, admin, 1.0, forks=False)
        closer.join(10)
    run.inject = 0.0
    pool.close()
    closed(run, pool, admin, baseline)
    admin.close()
    print(json.dumps({"ok": not run.failures, "failures": run.failures[:20], "numbers": run.numbers}))
    return 0


def quiesced(run: Run, pool: ConnectionPool, admin: Any) -> None:
    try:
        pool.check_invariants()
    except AssertionError as exc:
        run.fail(str(exc))
    stats = pool.stats()
    if stats["in_use"] or stats["waiting"]:
        run.fail(f"after quiescence: in_use {stats['in_use']}, waiting {stats['waiting']}")
    try:
        conns = [pool.getconn(timeout=5) for _ in range(pool.max_size)]
        for conn in conns:
            pool.putconn(conn)
    except PoolError as exc:
        run.fail(f"max_size checkouts failed after quiescence: {exc!r} {pool.stats()}")
    settle(run, pool, admin, lambda: pool.stats()["size"], "open connections")


def closed(run: Run, pool: ConnectionPool, admin: Any, baseline: set[str]) -> None:
    stats = pool.stats()
    if stats["size"] or stats["waiting"]:
        run.fail(f"after close: size {stats['size']}, waiting {stats['waiting']}")
    settle(run, pool, admin, lambda: 0, "zero after close")
    leaked = fds() - baseline
    if leaked:
        run.fail(f"descriptors leaked: {sorted(leaked)}")


def settle(run: Run, pool: ConnectionPool, admin: Any, want: Any, what: str) -> None:
    deadline = time.monotonic() + 10  # terminated backends exit shortly after
    while len(run.ours(admin)) != want() and time.monotonic() < deadline:
        time.sleep(0.05)
    if len(run.ours(admin)) != want():
        run.fail(f"server backends {len(run.ours(admin))} != {what} {want()}")


if __name__ == "__main__":
    sys.exit(main())
