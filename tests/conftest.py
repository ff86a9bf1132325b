"""Shared fixtures: one throwaway PostgreSQL for the session, pools that always close."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pgpool_wsgi import ConnectionPool, PgPoolMiddleware
from tests.pgserver import PgServer


@pytest.fixture(scope="session")
def pg() -> Iterator[PgServer]:
    """The session's PostgreSQL server (started once, always stopped)."""
    server = PgServer(name="session")
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def dsn(pg: PgServer) -> str:
    return pg.dsn()


@pytest.fixture
def make_pool(dsn: str) -> Iterator[Callable[..., ConnectionPool]]:
    """Build pools against the session server; each is closed after the test."""
    pools: list[ConnectionPool] = []

    def make(**options: Any) -> ConnectionPool:
        options.setdefault("dsn", dsn)
        pool = ConnectionPool(**options)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()


@pytest.fixture
def make_middleware() -> Iterator[Callable[..., PgPoolMiddleware]]:
    """Build middlewares; their pools are closed after the test."""
    made: list[PgPoolMiddleware] = []

    def make(app: Any, **options: Any) -> PgPoolMiddleware:
        middleware = PgPoolMiddleware(app, **options)
        made.append(middleware)
        return middleware

    yield make
    for middleware in made:
        middleware.close()


@pytest.fixture
def pool_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="pgpool_wsgi")
    return caplog


def backend_pid(conn: Any) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        pid: int = cur.fetchone()[0]
    conn.rollback()
    return pid
