"""Capped exponential backoff with jitter, interruptible by an event.

Used only on error paths (server unreachable, 5xx); the hot path never sleeps.
"""

from __future__ import annotations

import random
import threading
import time

__all__ = ["Backoff"]


class Backoff:
    """Delays `initial_s`, 2×, 4×… up to `max_s`, each with ±25 % jitter so workers don't stampede."""

    def __init__(self, *, initial_s: float = 0.5, max_s: float = 30.0) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.failures = 0

    def next_delay_s(self) -> float:
        base = min(self.initial_s * (2**self.failures), self.max_s)
        self.failures += 1
        return base * random.uniform(0.75, 1.25)

    def reset(self) -> None:
        self.failures = 0

    def sleep(self, stop: threading.Event | None = None) -> bool:
        """Sleep the next delay; return True early if `stop` is set."""
        delay = self.next_delay_s()
        if stop is None:
            time.sleep(delay)
            return False
        return stop.wait(delay)
