"""Stream a job's output to a local log file and, in batches, to the server.

Two threads, so the job never waits on the network: the reader drains the pipe into the local log
file as fast as the job writes; the sender ships what the file holds beyond the acknowledged offset
(`POST /v1/runs/{id}/logs?offset=N`), at most every `flush_interval_s` or as soon as `batch_bytes`
are pending. A failed send is retried at the same offset (the server ignores a resent offset), so
an outage of the server delays the live log but loses nothing and never stalls the job.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from openweights._exceptions import (
    APIConnectionError,
    APIStatusError,
    ConflictError,
    InternalServerError,
    RateLimitError,
)
from openweights.client._base import SyncHTTP
from openweights.worker._retry import Backoff

__all__ = ["LogShipper"]

logger = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 0.5
BATCH_BYTES = 64 * 1024
MAX_REQUEST_BYTES = 1024 * 1024
_READ_BYTES = 64 * 1024
_MAX_RESYNCS = 3


class LogShipper:
    """Pipe → local file → server, with offsets; see the module docstring for why two threads."""

    def __init__(
        self,
        http: SyncHTTP,
        run_id: int,
        source: IO[bytes],
        log_path: Path,
        *,
        on_fenced: Callable[[], None] = lambda: None,
        echo: IO[bytes] | None = None,
        flush_interval_s: float = FLUSH_INTERVAL_S,
        batch_bytes: int = BATCH_BYTES,
        max_request_bytes: int = MAX_REQUEST_BYTES,
    ) -> None:
        self._http = http
        self._run_id = run_id
        self._source = source
        self.log_path = log_path
        self._on_fenced = on_fenced
        self._echo = echo
        self._flush_interval_s = flush_interval_s
        self._batch_bytes = batch_bytes
        self._max_request_bytes = max_request_bytes

        self._cond = threading.Condition()
        self.written = 0  # bytes in the local log file
        self.shipped = 0  # bytes the server acknowledged
        self._pending_since: float | None = None
        self._eof = False
        self._closing = False
        self._broken = False  # the server refused our log for good (non-409 4xx)
        self._abandon = threading.Event()
        self._rewound_to: set[int] = set()
        self._resyncs = 0
        self.requests = 0

        self._log_file = open(log_path, "ab", buffering=0)  # noqa: SIM115 - closed by the reader
        self._reader = threading.Thread(
            target=self._read_loop, name=f"log-reader-{run_id}", daemon=True
        )
        self._sender = threading.Thread(
            target=self._send_loop, name=f"log-sender-{run_id}", daemon=True
        )

    def start(self) -> LogShipper:
        self._reader.start()
        self._sender.start()
        return self

    # ---- reader -------------------------------------------------------------------------------
    def _read_loop(self) -> None:
        fd = self._source.fileno()
        poller = select.poll()  # not select(): it breaks on fds above 1024 in a long-lived worker
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        try:
            while not self._abandon.is_set():
                # The timeout only lets an abandoned reader notice; data wakes it at once.
                if not poller.poll(500):
                    continue
                data = os.read(fd, _READ_BYTES)
                if not data:
                    break
                self._log_file.write(data)
                if self._echo is not None:
                    try:
                        self._echo.write(data)
                        self._echo.flush()
                    except (OSError, ValueError):
                        self._echo = None
                with self._cond:
                    self.written += len(data)
                    if self._pending_since is None:
                        self._pending_since = time.monotonic()
                    self._cond.notify_all()
        except OSError as e:
            logger.warning("run %s: reading job output failed: %s", self._run_id, e)
        finally:
            self._log_file.close()
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    # ---- sender -------------------------------------------------------------------------------
    def _next_batch(self) -> tuple[int, int] | None:
        """Block until a batch is due; return (offset, length), or None when there is nothing more."""
        with self._cond:
            while True:
                if self._abandon.is_set() or self._broken:
                    return None
                pending = self.written - self.shipped
                final = self._eof or self._closing
                if pending <= 0 and self._eof:
                    return None
                if pending > 0:
                    age = time.monotonic() - (self._pending_since or 0.0)
                    if pending >= self._batch_bytes or final or age >= self._flush_interval_s:
                        return self.shipped, min(pending, self._max_request_bytes)
                    timeout: float | None = self._flush_interval_s - age
                else:
                    timeout = None
                self._cond.wait(timeout)

    def _send_loop(self) -> None:
        backoff = Backoff(initial_s=0.25, max_s=5.0)
        with open(self.log_path, "rb") as reader:
            while True:
                batch = self._next_batch()
                if batch is None:
                    break
                offset, length = batch
                reader.seek(offset)
                data = reader.read(length)
                started = time.monotonic()
                if self._post(offset, data, backoff):
                    backoff.reset()
                    with self._cond:
                        self._pending_since = started if self.written > self.shipped else None
                        self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _post(self, offset: int, data: bytes, backoff: Backoff) -> bool:
        """Send one batch; on success advance `shipped`. False: retry later (after a backoff)."""
        self.requests += 1
        try:
            response = self._http.request(
                "POST",
                f"/v1/runs/{self._run_id}/logs",
                params={"offset": offset},
                content=data,
                headers={"Content-Type": "application/octet-stream"},
                timeout_s=30,
                retry=False,
            )
        except ConflictError as e:
            if e.type == "conflict" and self._resyncs < _MAX_RESYNCS:
                # Not fenced: the server holds fewer bytes than our offset (a gap). Resend from
                # 0; its answer carries the size it holds, and we continue from there.
                self._resyncs += 1
                logger.warning(
                    "run %s: log offset %d refused (%s); resyncing", self._run_id, offset, e
                )
                with self._cond:
                    self.shipped = 0
                return False
            logger.warning("run %s: log upload refused with 409: run fenced", self._run_id)
            self._abandon.set()
            self._on_fenced()
            return False
        except (APIConnectionError, InternalServerError, RateLimitError) as e:
            logger.info(
                "run %s: log upload at offset %d failed (%s); retrying", self._run_id, offset, e
            )
            backoff.sleep(self._abandon)
            return False
        except APIStatusError as e:
            logger.error("run %s: server refused the log (%s); live log stops", self._run_id, e)
            with self._cond:
                self._broken = True
                self._cond.notify_all()
            return False
        acked = offset + len(data)
        size = _size(response)
        with self._cond:
            # The server says how much of our log it holds: continue from there. Less than we
            # sent means it lost bytes, so resend (once per position: a confused server cannot
            # loop us); more means an earlier resend had already landed.
            new = acked
            if size is not None and (size >= acked or size not in self._rewound_to):
                if size < acked:
                    self._rewound_to.add(size)
                    logger.warning(
                        "run %s: server holds %d log bytes, expected %d; resending",
                        self._run_id,
                        size,
                        acked,
                    )
                new = size
            if new > offset:
                self._resyncs = 0
            self.shipped = max(min(new, self.written), 0)
        return True

    # ---- control ------------------------------------------------------------------------------
    def wait_eof(self, timeout_s: float) -> bool:
        """Wait until the job's pipe is closed (every writer exited)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._eof, timeout_s)

    def close(self, *, eof_timeout_s: float = 5.0, flush_timeout_s: float = 60.0) -> bool:
        """Drain the pipe, ship everything, stop. True when the server holds the whole log."""
        if not self.wait_eof(eof_timeout_s):
            # A process that escaped the group (setsid) still holds the pipe: stop reading it.
            logger.warning(
                "run %s: job output still open after exit; stop reading it", self._run_id
            )
            self._abandon_reader_only()
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            done = self._cond.wait_for(
                lambda: self.shipped >= self.written or self._broken or self._abandon.is_set(),
                flush_timeout_s,
            )
        if not done:
            logger.warning(
                "run %s: could not ship the last %d log bytes",
                self._run_id,
                self.written - self.shipped,
            )
        self.abandon()
        self._reader.join(timeout=2)
        return bool(done) and self.shipped >= self.written

    def _abandon_reader_only(self) -> None:
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def abandon(self) -> None:
        """Stop both threads now (fenced, or done)."""
        self._abandon.set()
        with self._cond:
            self._cond.notify_all()

    def tail(self, max_bytes: int = 2048) -> str:
        """The last `max_bytes` of the local log, from a line start when possible."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - max_bytes))
                data = f.read()
        except OSError:
            return ""
        if len(data) >= max_bytes and b"\n" in data[:-1]:
            data = data[data.index(b"\n") + 1 :]
        return data.decode("utf-8", errors="replace")


def _size(response: object) -> int | None:
    try:
        body = response.json()  # type: ignore[attr-defined]
        size = body.get("size") if isinstance(body, dict) else None
        return int(size) if size is not None else None
    except (ValueError, TypeError, AttributeError):
        return None
