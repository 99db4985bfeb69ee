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


class Signal:
    """A one-shot `asyncio.Event` without its per-wait machinery: `set` resolves the waiting
    futures directly, so a parked request resumes on the loop's next turn (an `asyncio.Event`
    waited on through `asyncio.wait` took three tasks and several turns per wake-up)."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = False
        self._waiters: list[asyncio.Future] = []

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(True)


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(False)


async def _wait(events: list[Signal], timeout_s: float) -> bool:
    if any(ev._set for ev in events):
        return True
    if timeout_s <= 0:
        return False
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    for ev in events:
        ev._waiters.append(fut)
    timer = loop.call_later(timeout_s, _expire, fut)
    try:
        return await fut
    finally:
        timer.cancel()
        for ev in events:
            if fut in ev._waiters:
                ev._waiters.remove(fut)


class Notifier:
    def __init__(self, hooks: Mapping[str, Callable[[str], None]] | None = None) -> None:
        # key prefix -> called with each such key, local or from another server: cache
        # invalidations (`auth:` revocations, `secrets:` writes)
        self._hooks = dict(hooks or {})
        self._events: dict[str, asyncio.Event] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: threading.Thread | None = None
        self._stop = threading.Event()
        #: backend pids of this server's own hot-path connections (`queries.RawDatabase`): their
        #: NOTIFYs come back to this server too, which acted on them at their commit already
        self.own_pids: set[int] = set()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def event(self, key: str) -> Signal:
        """Take the event *before* checking the condition, so no wake-up falls in between."""
        ev = self._events.get(key)
        if ev is None:
            ev = self._events[key] = Signal()
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
    async def wait(ev: Signal, timeout_s: float) -> bool:
        """Until `ev` is set (True) or `timeout_s` passed (False)."""
        return await _wait([ev], timeout_s)

    @staticmethod
    async def wait_any(events: list[Signal], timeout_s: float) -> bool:
        """Until one of `events` is set (True) or `timeout_s` passed (False)."""
        return await _wait(events, timeout_s)

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
                            if n.pid not in self.own_pids:
                                self.notify_threadsafe(n.payload)
            except Exception as e:  # reconnect: a restarted database must not stop wake-ups
                log.warning("LISTEN connection failed (%s); reconnecting", e)
                self._stop.wait(1.0)

    def close(self) -> None:
        self._stop.set()
