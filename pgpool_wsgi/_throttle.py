"""Log throttling: an outage must not turn every request into a log line."""

from __future__ import annotations

import math

__all__ = ["Throttle"]


class Throttle:
    """At most ``burst`` lines per ``window`` seconds; the next line says how many were not logged."""

    __slots__ = ("burst", "count", "skipped", "window", "window_start")

    def __init__(self, burst: int = 5, window: float = 10.0) -> None:
        self.burst, self.window = burst, window
        self.window_start = -math.inf
        self.count = self.skipped = 0

    def allow(self, now: float) -> tuple[bool, int]:
        """(log this line?, lines skipped before it). Races only miscount a line."""
        if now - self.window_start >= self.window:
            self.window_start, self.count = now, 0
        if self.count >= self.burst:
            self.skipped += 1
            return False, 0
        self.count += 1
        skipped, self.skipped = self.skipped, 0
        return True, skipped
