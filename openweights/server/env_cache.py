"""Each org's decrypted secrets, cached for the claims of this server process.

A claim hands the org's secrets to the job; reading and decrypting them on every claim costs a
statement and a Fernet decryption per secret. Entries are dropped after a secret write commits on
this server (`secrets:<org>` key) and, through LISTEN/NOTIFY, on the others; a short TTL bounds
staleness should a notification be lost (a dropped LISTEN connection).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

CACHE_TTL_S = 10.0
CACHE_MAX = 10_000


def secrets_key(org_id: str) -> str:
    return f"secrets:{org_id}"


class SecretEnvCache:
    def __init__(self, ttl_s: float = CACHE_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[str, tuple[dict[str, str], float]] = {}
        # Bumped by every drop: a load that started before a drop must not store what it read,
        # or a claim that read the old secrets just before a write committed would cache them.
        self._generation = 0
        self._lock = threading.Lock()

    def get(self, org_id: str, load: Callable[[], dict[str, str]]) -> dict[str, str]:
        """The org's secrets; `load()` reads them from the database on a miss."""
        now = time.monotonic()
        hit = self._entries.get(org_id)
        if hit is not None and now - hit[1] <= self.ttl_s:
            return dict(hit[0])
        generation = self._generation
        env = load()
        with self._lock:
            if generation == self._generation:
                if len(self._entries) >= CACHE_MAX:
                    self._entries.clear()
                self._entries[org_id] = (env, now)
        return dict(env)

    def peek(self, org_id: str) -> dict[str, str] | None:
        """The org's secrets if they are cached and fresh; None (nothing loaded) otherwise."""
        hit = self._entries.get(org_id)
        if hit is not None and time.monotonic() - hit[1] <= self.ttl_s:
            return dict(hit[0])
        return None

    def drop(self, key: str) -> None:
        """`secrets:<org_id>`, or anything else under `secrets:` (drop all)."""
        org_id = key.removeprefix("secrets:")
        with self._lock:
            self._generation += 1
            if org_id:
                self._entries.pop(org_id, None)
            else:
                self._entries.clear()
