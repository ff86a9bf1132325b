"""Micro-benchmark: the pool's checkout and return, side by side with the alternatives.

One process, one PostgreSQL. Every row is measured once per round; rows run
in a different order each round (interleaved) and each cell is the median
over rounds. A ratio is the median over rounds of the two rows' values from
the same round, so a machine that is busy for a while moves both alike.

Sections:

* (a) checkout + return, no query: ns/op, one thread;
* (b) checkout + ``SELECT 1`` + return: ns/op, one thread;
* (c) 8 threads contending for 4 connections, each op checkout +
  ``SELECT 1`` + return: ops/s;
* (d) the middleware's own cost per request, in-process: a direct WSGI call
  loop (no HTTP) with the bare app, an excluded path, and a checkout without
  a query (garbage collector on: cyclic garbage is part of a request's cost).

Every connection is in autocommit (a connection factory setting it once at
connect, or the pool's own option), so a query is one round trip and no pool
has a transaction to roll back: the rows differ only in the pool. The psycopg
3 rows (psycopg_pool) also differ in the driver in (b) and (c). SQLAlchemy is
its ``QueuePool(creator)`` used directly (no engine); DBUtils is ``PooledDB``
with its defaults. psycopg2's ``ThreadedConnectionPool`` raises at once when
exhausted, so in (c) it sits behind a ``threading.BoundedSemaphore(4)``, as
its users have to do. The timed loops of (a)-(c) run with the garbage
collector off (as ``timeit`` does).

Run: ``.venv/bin/python bench/micro.py [--quick] [--dsn DSN] [--out bench/results]``
"""

from __future__ import annotations

import gc
import threading
import time
import wsgiref.util
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import _util
import psycopg2
import psycopg2.extensions

MAX_SIZE = 4
THREADS = 8

Get = Callable[[], Any]
Put = Callable[[Any], None]
Query = Callable[[Any], None]


class AutocommitConnection(psycopg2.extensions.connection):  # type: ignore[misc]
    """A psycopg2 connection that is in autocommit from the start."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.autocommit = True


def connect2(dsn: str) -> Any:
    return psycopg2.connect(dsn, connection_factory=AutocommitConnection)


def query2(conn: Any) -> None:
    """``SELECT 1`` with psycopg2 (also through SQLAlchemy's and DBUtils' wrappers)."""
    cur = conn.cursor()
    cur.execute("SELECT 1")
    cur.fetchone()
    cur.close()


def query3(conn: Any) -> None:
    """``SELECT 1`` with psycopg 3."""
    conn.execute("SELECT 1").fetchone()


@dataclass
class Subject:
    """One way of getting a connection: ``put(get())`` is one checkout + return."""

    key: str
    label: str
    get: Get
    put: Put
    query: Query = query2
    close: Callable[[], None] = lambda: None
    get_contended: Get | None = None  # (c): when get() must be wrapped to wait
    put_contended: Put | None = None
    note: str = ""

    def contended(self) -> tuple[Get, Put]:
        return self.get_contended or self.get, self.put_contended or self.put


# -- the subjects -------------------------------------------------------------


def pgpool_subject(dsn: str, check: str) -> Subject:
    from pgpool_wsgi import ConnectionPool

    pool = ConnectionPool(dsn, max_size=MAX_SIZE, check=check,
                          connect_kwargs={"connection_factory": AutocommitConnection})
    label = "pgpool_wsgi, check=none" if check == "none" else f"pgpool_wsgi, check={check} (default)"
    return Subject(f"pgpool_{check}", label, pool.getconn, pool.putconn, close=pool.close)


def psycopg2_subject(dsn: str) -> Subject:
    from psycopg2.pool import ThreadedConnectionPool

    # minconn == maxconn: below maxconn, putconn() closes what is above minconn.
    pool = ThreadedConnectionPool(MAX_SIZE, MAX_SIZE, dsn, connection_factory=AutocommitConnection)
    gate = threading.BoundedSemaphore(MAX_SIZE)

    def get() -> Any:
        gate.acquire()
        return pool.getconn()

    def put(conn: Any) -> None:
        pool.putconn(conn)
        gate.release()

    return Subject("psycopg2", "psycopg2 ThreadedConnectionPool", pool.getconn, pool.putconn,
                   close=pool.closeall, get_contended=get, put_contended=put,
                   note="(c): behind a BoundedSemaphore(4), it raises when exhausted")


def psycopg_pool_subject(dsn: str) -> Subject:
    from psycopg_pool import ConnectionPool

    pool = ConnectionPool(dsn, min_size=MAX_SIZE, max_size=MAX_SIZE, kwargs={"autocommit": True}, open=True)
    pool.wait()
    return Subject("psycopg_pool", "psycopg_pool ConnectionPool (psycopg 3)", pool.getconn, pool.putconn,
                   query=query3, close=pool.close, note="getconn()/putconn(), no check callback")


def sqlalchemy_subject(dsn: str, pre_ping: bool) -> Subject:
    from sqlalchemy.dialects.postgresql.psycopg2 import PGDialect_psycopg2
    from sqlalchemy.pool import QueuePool

    # The dialect is what pre_ping uses to ping (and what resets on return).
    pool = QueuePool(lambda: connect2(dsn), pool_size=MAX_SIZE, max_overflow=0, pre_ping=pre_ping,
                     dialect=PGDialect_psycopg2(dbapi=psycopg2))
    fairy = pool.connect()
    put = type(fairy).close  # _ConnectionFairy.close(fairy) returns it
    fairy.close()
    key, label = ("sqlalchemy_ping", "SQLAlchemy QueuePool, pre_ping") if pre_ping else (
        "sqlalchemy", "SQLAlchemy QueuePool")
    return Subject(key, label, pool.connect, put, close=pool.dispose,
                   note="QueuePool(creator, dialect=PGDialect_psycopg2()) used directly, no engine")


def dbutils_subject(dsn: str) -> Subject:
    from dbutils.pooled_db import PooledDB

    pool = PooledDB(psycopg2, maxcached=MAX_SIZE, maxconnections=MAX_SIZE, blocking=True,
                    dsn=dsn, connection_factory=AutocommitConnection)
    conn = pool.connection()
    put = type(conn).close
    conn.close()
    return Subject("dbutils", "DBUtils PooledDB", pool.connection, put, close=pool.close)


def raw_subject(dsn: str) -> Subject:
    import queue

    conn = connect2(dsn)
    spares = [connect2(dsn) for _ in range(MAX_SIZE)]
    line: queue.SimpleQueue[Any] = queue.SimpleQueue()
    for spare in spares:
        line.put(spare)

    def get() -> Any:
        return conn

    def put(c: Any) -> None:
        pass

    def close() -> None:
        for c in [conn, *spares]:
            c.close()

    return Subject("raw", "raw reused connection (floor)", get, put, close=close,
                   get_contended=line.get, put_contended=line.put,
                   note="(a)/(b): one connection, two no-op calls; (c): 4 connections in a queue.SimpleQueue")


def connect_subject(dsn: str) -> Subject:
    gate = threading.BoundedSemaphore(MAX_SIZE)

    def get() -> Any:
        return connect2(dsn)

    def put(conn: Any) -> None:
        conn.close()

    def get_gated() -> Any:
        gate.acquire()
        return connect2(dsn)

    def put_gated(conn: Any) -> None:
        conn.close()
        gate.release()

    return Subject("connect", "connect per operation", get, put, get_contended=get_gated,
                   put_contended=put_gated, note="psycopg2.connect() + close(); (c): at most 4 at once")


def make_subjects(dsn: str) -> list[Subject]:
    return [
        pgpool_subject(dsn, "none"),
        pgpool_subject(dsn, "auto"),
        psycopg2_subject(dsn),
        psycopg_pool_subject(dsn),
        sqlalchemy_subject(dsn, pre_ping=False),
        sqlalchemy_subject(dsn, pre_ping=True),
        dbutils_subject(dsn),
        raw_subject(dsn),
        connect_subject(dsn),
    ]


# -- timing -------------------------------------------------------------------


def loop_bare(get: Get, put: Put, n: int) -> int:
    """``n`` checkouts + returns; the elapsed ns."""
    it = range(n)
    start = time.perf_counter_ns()
    for _ in it:
        put(get())
    return time.perf_counter_ns() - start


def loop_query(get: Get, put: Put, query: Query, n: int) -> int:
    it = range(n)
    start = time.perf_counter_ns()
    for _ in it:
        conn = get()
        query(conn)
        put(conn)
    return time.perf_counter_ns() - start


def without_gc(run: Callable[[], int], keep_gc: bool = False) -> int:
    if keep_gc:
        return run()
    enabled = gc.isenabled()
    gc.disable()
    try:
        return run()
    finally:
        if enabled:
            gc.enable()


def ns_per_op(run: Callable[[int], int], seconds: float, keep_gc: bool = False) -> float:
    """Calibrate ``n`` so one run takes about ``seconds``; return ns per op of that run."""
    n = 1
    while True:
        elapsed = without_gc(lambda n=n: run(n), keep_gc)
        if elapsed >= 0.02e9 or n >= 1 << 24:
            break
        n *= 4
    n = max(1, int(n * seconds * 1e9 / max(elapsed, 1)))
    return without_gc(lambda: run(n), keep_gc) / n


def contended_ops(get: Get, put: Put, query: Query, seconds: float) -> float:
    """``THREADS`` threads doing checkout + query + return for ``seconds``; ops/s."""
    stop = threading.Event()
    counts = [0] * THREADS
    barrier = threading.Barrier(THREADS + 1)

    def work(i: int) -> None:
        barrier.wait()
        n = 0
        while not stop.is_set():
            conn = get()
            query(conn)
            put(conn)
            n += 1
        counts[i] = n

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(THREADS)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    elapsed = time.perf_counter() - start
    for t in threads:
        t.join(30)
    if any(t.is_alive() for t in threads):
        raise RuntimeError("a contending thread did not finish")
    return sum(counts) / elapsed


@dataclass
class Section:
    """One table: a value per subject per round."""

    key: str
    title: str
    unit: str  # "ns/op" (lower is better) or "ops/s" (higher is better)
    measure: Callable[[Subject], float]
    values: dict[str, list[float]] = field(default_factory=dict)

    def run(self, subjects: Sequence[Subject], rounds: int) -> None:
        for r in range(rounds):
            for subject in _util.rotated(subjects, r):
                self.values.setdefault(subject.key, []).append(self.measure(subject))
            print(f"  {self.key}: round {r + 1}/{rounds} done", flush=True)


def sections(row_seconds: float, threaded_seconds: float) -> list[Section]:
    def bare(s: Subject) -> float:
        return ns_per_op(lambda n: loop_bare(s.get, s.put, n), row_seconds)

    def query(s: Subject) -> float:
        return ns_per_op(lambda n: loop_query(s.get, s.put, s.query, n), row_seconds)

    def threaded(s: Subject) -> float:
        get, put = s.contended()
        return contended_ops(get, put, s.query, threaded_seconds)

    return [
        Section("a", "(a) checkout + return, no query", "ns/op", bare),
        Section("b", "(b) checkout + SELECT 1 + return", "ns/op", query),
        Section("c", f"(c) {THREADS} threads, {MAX_SIZE} connections, checkout + SELECT 1 + return",
                "ops/s", threaded),
    ]


# -- (d): the middleware in-process ---------------------------------------------


@dataclass
class WsgiRow:
    key: str
    label: str
    app: Callable[..., Iterable[bytes]]
    path: str
    close: Callable[[], None] = lambda: None


def wsgi_rows(dsn: str) -> list[WsgiRow]:
    from pgpool_wsgi import PgPoolMiddleware

    default = PgPoolMiddleware(_util.ok_app, dsn=dsn, max_size=MAX_SIZE, exclude_paths=("/static",))
    unchecked = PgPoolMiddleware(_util.ok_app, dsn=dsn, max_size=MAX_SIZE, check="none")
    autocommit = PgPoolMiddleware(_util.ok_app, dsn=dsn, max_size=MAX_SIZE, transaction="autocommit")
    return [
        WsgiRow("bare", "bare app, no middleware", _util.ok_app, "/x"),
        WsgiRow("excluded", "middleware, excluded path (exclude_paths)", default, "/static/x"),
        WsgiRow("checkout", "middleware, checkout, no query (defaults)", default, "/x", default.pool.close),
        WsgiRow("checkout_none", "middleware, checkout, no query, check=none", unchecked, "/x",
                unchecked.pool.close),
        WsgiRow("checkout_autocommit", "middleware, checkout, no query, transaction=autocommit", autocommit,
                "/x", autocommit.pool.close),
    ]


def run_wsgi(dsn: str, rounds: int, row_seconds: float) -> dict[str, Any]:
    rows = wsgi_rows(dsn)
    values: dict[str, list[float]] = {}
    try:
        for r in range(rounds):
            for row in _util.rotated(rows, r):
                environ: dict[str, Any] = {"PATH_INFO": row.path, "REQUEST_METHOD": "GET"}
                wsgiref.util.setup_testing_defaults(environ)
                # The collector stays on: garbage a request leaves in cycles is part of its cost.
                values.setdefault(row.key, []).append(
                    ns_per_op(lambda n, a=row.app, e=environ: _util.loop_wsgi(a, e, n), row_seconds, keep_gc=True))
            print(f"  d: round {r + 1}/{rounds} done", flush=True)
    finally:
        for row in rows:
            row.close()
    return {"rows": [(row.key, row.label) for row in rows], "values": values}


# -- report -------------------------------------------------------------------


def section_table(section: Section, subjects: Sequence[Subject]) -> str:
    v = section.values
    faster_is_lower = section.unit == "ns/op"
    header = ["", f"median {section.unit}", "vs psycopg2 pool", "vs floor"]
    if faster_is_lower:
        header.append("above floor, ns")
    rows = []
    for s in subjects:
        # "vs": how many times the row's cost is the reference's (time per op).
        if faster_is_lower:
            vs_pg2 = _util.ratio_median(v[s.key], v["psycopg2"])
            vs_floor = _util.ratio_median(v[s.key], v["raw"])
        else:
            vs_pg2 = _util.ratio_median(v["psycopg2"], v[s.key])
            vs_floor = _util.ratio_median(v["raw"], v[s.key])
        row = [s.label, _util.fmt(_util.median(v[s.key])), _util.fmt_ratio(vs_pg2), _util.fmt_ratio(vs_floor)]
        if faster_is_lower:
            row.append(_util.fmt(_util.median([a - b for a, b in zip(v[s.key], v["raw"])])))
        rows.append(row)
    return f"### {section.title}\n\n" + _util.md_table(header, rows)


def wsgi_table(wsgi: dict[str, Any]) -> str:
    v = wsgi["values"]
    rows = [[label, _util.fmt(_util.median(v[key]) / 1000, 2),
             _util.fmt(_util.median([a - b for a, b in zip(v[key], v["bare"])]) / 1000, 2)]
            for key, label in wsgi["rows"]]
    return ("### (d) the middleware's own cost per request, in-process WSGI call loop\n\n"
            + _util.md_table(["", "median µs/request", "above the bare app, µs"], rows))


def targets(values: dict[str, dict[str, list[float]]]) -> list[tuple[str, float, float, bool]]:
    """(what, measured ratio, bar, met): the lead's targets for (a); ratio = their ns / ours."""
    a = values["a"]

    def speedup(ours: str, theirs: str) -> float:
        return _util.ratio_median(a[theirs], a[ours])

    checks = [
        ("(a) check=none vs psycopg2 ThreadedConnectionPool", speedup("pgpool_none", "psycopg2"), 1.0),
        ("(a) default check vs psycopg_pool getconn/putconn", speedup("pgpool_auto", "psycopg_pool"), 1.0),
        ("(a) check=none vs SQLAlchemy QueuePool", speedup("pgpool_none", "sqlalchemy"), 4.0),
        ("(a) default check vs SQLAlchemy QueuePool", speedup("pgpool_auto", "sqlalchemy"), 4.0),
    ]
    return [(what, got, bar, got >= bar) for what, got, bar in checks]


def report(subjects: Sequence[Subject], done: Sequence[Section], wsgi: dict[str, Any], header: str,
           rounds: int) -> str:
    parts = [f"## Micro-benchmarks\n\n{header}\n\nMedian of {rounds} interleaved rounds. "
             "\"vs\" columns: how many times the row's time per operation is the reference's "
             "(median of per-round ratios; below 1.00x is faster)."]
    parts += [section_table(s, subjects) for s in done]
    notes = [f"* {s.label}: {s.note}" for s in subjects if s.note]
    parts.append("Notes:\n\n" + "\n".join(notes))
    parts.append(wsgi_table(wsgi))
    met = targets({s.key: s.values for s in done})
    parts.append("### Targets (speed-up = their ns/op ÷ ours, same run)\n\n" + _util.md_table(
        ["target", "speed-up", "bar", "met"],
        [[what, _util.fmt_ratio(got), f">= {bar:g}x", "yes" if ok else "**no**"] for what, got, bar, ok in met]))
    return "\n\n".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
    parser = _util.base_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    _util.sigterm_as_exit()
    rounds = args.rounds or (2 if args.quick else 7)
    row_seconds, threaded_seconds = (0.03, 0.2) if args.quick else (0.25, 0.75)
    with _util.database(args.dsn) as dsn:
        header = (f"Machine: {_util.machine()}. {_util.server_version(dsn)} over TCP on 127.0.0.1; "
                  + _util.versions("pgpool_wsgi", "psycopg2-binary", "psycopg", "psycopg-pool", "SQLAlchemy",
                                   "DBUtils") + ".")
        subjects = make_subjects(dsn)
        try:
            done = sections(row_seconds, threaded_seconds)
            warm = sections(0.01, 0.05)
            for s in warm:  # opens every pool's connections before anything is timed
                s.run(subjects, 1)
            for s in done:
                s.run(subjects, rounds)
        finally:
            for subject in subjects:
                subject.close()
        wsgi = run_wsgi(dsn, rounds, row_seconds)
    data = {"header": header, "rounds": rounds, "order": [s.key for s in subjects],
            "labels": {s.key: s.label for s in subjects},
            "sections": {s.key: {"title": s.title, "unit": s.unit, "values": s.values} for s in done},
            "wsgi": wsgi,
            "targets": targets({s.key: s.values for s in done})}
    _util.write_results(args.out, "micro", report(subjects, done, wsgi, header, rounds), data)


if __name__ == "__main__":
    _util.run_main(main)
