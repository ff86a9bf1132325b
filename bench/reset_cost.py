"""What a ``reset_sql`` costs per returned connection: none, the README's recipe, DISCARD ALL.

Times ``_conn.reset()``, the work the pool does when a connection comes back
(outside its lock), on one connection over TCP to a local server, in two
states: after a request that committed (transaction idle: without
``reset_sql`` there is nothing to send) and after one that left a
transaction open (a rollback is due anyway). Rows are interleaved, one
round each, and each cell is the median over rounds of the mean µs per
reset.

Run: ``.venv/bin/python bench/reset_cost.py [--quick] [--dsn DSN]``
"""

from __future__ import annotations

import time
from typing import Any

import _util
import psycopg2

RESETS = {
    "none (rollback + restore)": None,
    "SELECT pg_advisory_unlock_all(); DEALLOCATE ALL": "SELECT pg_advisory_unlock_all(); DEALLOCATE ALL",
    "... ; UNLISTEN *; CLOSE ALL": "SELECT pg_advisory_unlock_all(); DEALLOCATE ALL; UNLISTEN *; CLOSE ALL",
    "DISCARD ALL": "DISCARD ALL",
}


def one_row(conn: Any, session: Any, reset_sql: str | None, *, open_transaction: bool, n: int) -> float:
    from pgpool_wsgi import _conn

    total = 0.0
    for _ in range(n):
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
        if not open_transaction:
            conn.commit()
        start = time.perf_counter()
        reason = _conn.reset(conn, session, reset_sql)
        total += time.perf_counter() - start
        assert reason is None, reason
    return total / n * 1e6


def main() -> None:
    args = _util.base_parser(__doc__.splitlines()[0]).parse_args()
    _util.repo_on_path()
    from pgpool_wsgi import _conn

    n, rounds = (200, 3) if args.quick else (2000, args.rounds or 7)
    with _util.database(args.dsn) as dsn:
        conn = psycopg2.connect(dsn)
        session = _conn.Session(conn)
        rows = [(name, sql, state) for state in (False, True) for name, sql in RESETS.items()]
        results: dict[tuple[str, bool], list[float]] = {(name, state): [] for name, _, state in rows}
        for r in range(rounds):
            for name, sql, state in _util.rotated(rows, r):
                results[(name, state)].append(one_row(conn, session, sql, open_transaction=state, n=n))
        conn.close()
        print(f"{_util.machine()}; {_util.server_version(dsn)}; {n} resets x {rounds} rounds, median µs/reset")
        table = [[name, _util.fmt(_util.median(results[(name, False)]), 1),
                  _util.fmt(_util.median(results[(name, True)]), 1)] for name in RESETS]
        print(_util.md_table(["reset_sql", "after a commit", "transaction left open"], table))


if __name__ == "__main__":
    _util.run_main(main)
