"""Wake-ups for long-polls: a claim waiting for a job, `job.wait()`, a heartbeat waiting for a
cancel, a log follower waiting for bytes. In one process an `asyncio.Event` per key; across
servers on PostgreSQL, LISTEN/NOTIFY carries the same keys."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)
CHANNEL = "openweights"


def queue_key(org_id: str) -> str:
    return f"queue:{org_id}"


def job_key(org_id: str, job_id: str) -> str:
    return f"job:{org_id}:{job_id}"


def run_key(run_id: int) -> str:
    return f"run:{run_id}"


class Notifier:
    def __init__(self, hooks: Mapping[str, Callable[[str], None]] | None = None) -> None:
        # key prefix -> called with each such key, local or from another server: cache
        # invalidations (`auth:` revocations, `secrets:` writes)
        self._hooks = dict(hooks or {})
        self._events: dict[str, asyncio.Event] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: threading.Thread | None = None
        self._stop = threading.Event()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def event(self, key: str) -> asyncio.Event:
        """Take the event *before* checking the condition, so no wake-up falls in between."""
        ev = self._events.get(key)
        if ev is None:
            ev = self._events[key] = asyncio.Event()
        return ev

    def notify(self, *keys: str) -> None:
        for key in keys:
            for prefix, hook in self._hooks.items():
                if key.startswith(prefix):
                    hook(key)
            ev = self._events.pop(key, None)
            if ev is not None:
                ev.set()

    def notify_threadsafe(self, *keys: str) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.notify, *keys)

    @staticmethod
    async def wait(ev: asyncio.Event, timeout_s: float) -> bool:
        if timeout_s <= 0:
            return ev.is_set()
        try:
            await asyncio.wait_for(ev.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    @staticmethod
    async def wait_any(events: list[asyncio.Event], timeout_s: float) -> bool:
        waits = [asyncio.ensure_future(ev.wait()) for ev in events]
        try:
            done, _ = await asyncio.wait(
                waits, timeout=max(timeout_s, 0), return_when=asyncio.FIRST_COMPLETED
            )
            return bool(done)
        finally:
            for w in waits:
                w.cancel()

    # -- PostgreSQL: other servers' writes ---------------------------------------------------

    def listen_postgres(self, sqlalchemy_url: str) -> None:
        dsn = sqlalchemy_url.replace("postgresql+psycopg://", "postgresql://", 1)
        self._listener = threading.Thread(
            target=self._listen, args=(dsn,), daemon=True, name="pg-listen"
        )
        self._listener.start()

    def _listen(self, dsn: str) -> None:
        import psycopg

        while not self._stop.is_set():
            try:
                with psycopg.connect(dsn, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    while not self._stop.is_set():
                        for n in conn.notifies(timeout=1.0):
                            self.notify_threadsafe(n.payload)
            except Exception as e:  # reconnect: a restarted database must not stop wake-ups
                log.warning("LISTEN connection failed (%s); reconnecting", e)
                self._stop.wait(1.0)

    def close(self) -> None:
        self._stop.set()
