"""A bounded, verifying HTTP load generator (stdlib only), shared by the server tests and the demo.

:func:`run_load` sends ``total`` ``GET /echo?token=...`` requests over
``concurrency`` client threads, one TCP connection per request
(``Connection: close``, so a pre-forking server spreads them over its
workers). Every answer is checked: status 200, JSON, and the token that comes
back is the one that was sent. Bounded in count and in time: each request has
a client-side timeout and nothing new is sent after ``deadline`` seconds.
"""

from __future__ import annotations

import http.client
import json
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode


@dataclass
class Answer:
    """One request: what was sent and what came back."""

    token: str
    status: int | None = None
    data: dict[str, Any] | None = None
    error: str | None = None
    at: float = 0.0  # seconds since the load started


@dataclass
class LoadReport:
    """What a load run saw, answer by answer and in sum."""

    total: int
    answers: list[Answer] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def sent(self) -> int:
        return len(self.answers)

    @property
    def ok(self) -> list[Answer]:
        """Answers with status 200 and a JSON body carrying a token."""
        return [a for a in self.answers if a.error is None and a.data is not None]

    @property
    def crossed(self) -> list[Answer]:
        """Answers carrying another request's token: someone else's rows."""
        return [a for a in self.ok if a.data is not None and a.data.get("token") != a.token]

    @property
    def errors(self) -> Counter[str]:
        """Error text -> count (non-200, unparsable body, transport error, timeout)."""
        return Counter(a.error for a in self.answers if a.error is not None)

    @property
    def unsent(self) -> int:
        return self.total - self.sent

    def per_pid(self) -> Counter[int]:
        """Worker pid -> answers it served."""
        return Counter(a.data["pid"] for a in self.ok if a.data is not None and "pid" in a.data)

    def values(self, key: str) -> set[Any]:
        return {a.data.get(key) for a in self.ok if a.data is not None}

    def by_pid(self, key: str) -> dict[int, set[Any]]:
        """Worker pid -> the values of ``key`` in its answers."""
        found: dict[int, set[Any]] = {}
        for a in self.ok:
            if a.data is not None:
                found.setdefault(a.data["pid"], set()).add(a.data.get(key))
        return found

    def summary(self) -> str:
        return (f"{self.sent}/{self.total} requests in {self.elapsed:.1f} s: {len(self.ok) - len(self.crossed)} "
                f"right, {len(self.crossed)} crossed, {sum(self.errors.values())} errors, "
                f"{len(self.per_pid())} worker pid(s)")


def fetch(host: str, port: int, path: str, *, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One ``GET`` on a fresh connection: status, headers (lower-case names), body. Transport errors propagate."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def get(host: str, port: int, path: str, *, timeout: float = 10.0) -> tuple[int, bytes]:
    """One ``GET`` on a fresh connection: status and body."""
    status, _, body = fetch(host, port, path, timeout=timeout)
    return status, body


def _first_line(body: bytes, limit: int = 160) -> str:
    text = body.decode("utf-8", "replace").strip()
    return (text.splitlines() or [""])[0][:limit]


def _one(host: str, port: int, path: str, params: dict[str, Any], timeout: float, answer: Answer) -> None:
    url = f"{path}?{urlencode({'token': answer.token, **params})}"
    try:
        status, body = get(host, port, url, timeout=timeout)
    except socket.timeout:
        answer.error = f"client timeout after {timeout:g} s"
        return
    except (OSError, http.client.HTTPException) as exc:
        answer.error = f"{type(exc).__name__}: {exc}"
        return
    answer.status = status
    if status != 200:
        answer.error = f"{status}: {_first_line(body)}"
        return
    try:
        data = json.loads(body)
    except ValueError:
        answer.error = f"200 with a body that is not JSON: {_first_line(body)}"
        return
    if not isinstance(data, dict) or "token" not in data:
        answer.error = f"200 without a token: {_first_line(body)}"
        return
    answer.data = data


def run_load(host: str, port: int, *, total: int = 2000, concurrency: int = 16, path: str = "/echo",
             params: dict[str, Any] | None = None, timeout: float = 10.0, deadline: float = 120.0,
             midway: Callable[[], None] | None = None) -> LoadReport:
    """Send ``total`` verified echo requests over ``concurrency`` threads; return what came back.

    ``midway`` is called once (from a client thread) when half the requests
    have been answered, e.g. to send a signal to the server under load.
    """
    report = LoadReport(total=total)
    lock = threading.Lock()
    state = {"next": 0, "done": 0}
    started = time.monotonic()
    stop_at = started + deadline
    extra = dict(params or {})

    def client() -> None:
        while True:
            with lock:
                n = state["next"]
                if n >= total or time.monotonic() >= stop_at:
                    return
                state["next"] = n + 1
            answer = Answer(token=f"{n}-{secrets.token_hex(8)}")
            _one(host, port, path, extra, timeout, answer)
            answer.at = time.monotonic() - started
            call_now = False
            with lock:
                report.answers.append(answer)
                state["done"] += 1
                call_now = midway is not None and state["done"] == total // 2
            if call_now and midway is not None:
                midway()

    threads = [threading.Thread(target=client, name=f"loadgen-{i}", daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        # Each thread stops sending at the deadline; one request may still run for `timeout`.
        t.join(max(stop_at - time.monotonic(), 0) + timeout + 5)
    report.elapsed = time.monotonic() - started
    with lock:
        report.answers = list(report.answers)
    return report
