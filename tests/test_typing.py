"""Type checking as a user sees it: mypy --strict on small programs (pgpool_wsgi/_types.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pgpool_wsgi import config
from pgpool_wsgi._types import PoolKwargs, PoolOptions, PoolStats
from pgpool_wsgi.middleware import MiddlewareKwargs

ROOT = Path(__file__).resolve().parents[1]

GOOD = '''
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import psycopg2.extensions

from pgpool_wsgi import ConnectionPool, PgPoolMiddleware


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    return [b""]


def setup(conn: psycopg2.extensions.connection) -> None:
    conn.autocommit = True


pool = ConnectionPool("postgresql://app@db/app", max_size=5, timeout=2.5, check="ping",
                      connect_kwargs={"sslmode": "require"}, configure=setup, name="main")
conn: psycopg2.extensions.connection = pool.getconn()
conn.commit()
pool.putconn(conn)
in_use: int = pool.stats()["in_use"]
closed: bool = pool.stats()["closed"]
middleware = PgPoolMiddleware(app, dsn="postgresql://app@db/app", max_size=3, transaction="commit",
                              checkout="lazy", exclude_paths=["/static"], retry_after=2,
                              pools={"replica": {"dsn": "postgresql://app@replica/app", "max_size": 2},
                                     "other": pool})
shared = PgPoolMiddleware(app, pool=pool, transaction="autocommit")
'''

BAD = {  # the line a user writes -> what mypy must say about it
    'ConnectionPool("postgresql://app@db/app", max_sise=5)': "max_sise",
    'ConnectionPool(max_size="ten")': "max_size",
    'ConnectionPool(transaction="commit")': "transaction",  # a middleware option
    'ConnectionPool(check="pong")': "check",
    'PgPoolMiddleware(app, transaction="comit")': "transaction",
    'PgPoolMiddleware(app, checkout="later")': "checkout",
    'PgPoolMiddleware(app, pools={"replica": {"max_sise": 2}})': "PoolOptions",
    'ConnectionPool().stats()["in_uze"]': "in_uze",
    'ConnectionPool().getconn().no_such_method()': "no_such_method",
}


def run_mypy(tmp_path: Path, source: str) -> tuple[int, str]:
    program = tmp_path / "user_program.py"
    program.write_text(source)
    env = {**os.environ, "MYPYPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-error-summary", "--cache-dir",
                           str(tmp_path / "cache"), "--python-version", "3.11", str(program)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr


def test_typed_options_accept_a_correct_program_and_reject_typos(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    code, output = run_mypy(tmp_path, GOOD)
    assert code == 0, output
    header = GOOD.split("pool = ConnectionPool(")[0]
    lines = [f"_{i} = {line}" for i, line in enumerate(BAD)]
    code, output = run_mypy(tmp_path, header + "\n".join(lines) + "\n")
    assert code == 1, output
    first = header.count("\n") + 1
    for offset, (line, word) in enumerate(BAD.items()):
        errors = re.findall(rf"user_program\.py:{first + offset}: error: (.*)", output)
        assert errors and any(word in e for e in errors), (line, errors, output)


def test_typed_dicts_hold_exactly_the_option_table() -> None:
    table = {o.name for o in config.OPTIONS}
    pool = {o.name for o in config.OPTIONS if o.scope == config.POOL}
    assert set(PoolKwargs.__optional_keys__) == pool - {"dsn"}
    assert set(PoolOptions.__optional_keys__) == pool
    assert set(MiddlewareKwargs.__optional_keys__) == table
    assert {"pid", "size", "idle", "in_use", "waiting", "checkouts", "connects"} <= PoolStats.__required_keys__
