"""Keep a run's lease alive and learn about cancels and fencing.

`POST /v1/runs/{id}/heartbeat` renews the lease at once and then long-polls up to `wait_s`,
answering early with `cancel: true`; so one loop both heartbeats every `lease_s/3` and hears a
cancel within a round-trip (the original polled every 5 s and then slept 60 s before SIGTERM).
"""

from __future__ import annotations

import logging
import threading
import time

from openweights._exceptions import (
    APIConnectionError,
    APIStatusError,
    AuthenticationError,
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
)
from openweights.client._base import SyncHTTP
from openweights.types import HeartbeatResponse
from openweights.worker._retry import Backoff

__all__ = ["Heartbeat", "RunControl", "heartbeat_wait_s"]

logger = logging.getLogger(__name__)

_MAX_WAIT_S = 120.0  # HeartbeatRequest.wait_s upper bound


class RunControl:
    """Flags that helper threads raise for the thread supervising a run; `wake` makes it look."""

    def __init__(self, wake: threading.Event, stop: threading.Event) -> None:
        self.wake = wake
        self.stop = stop  # the worker is shutting down
        self.cancel = threading.Event()  # the job was canceled
        self.fenced = threading.Event()  # the server no longer accepts this run (409)
        self.exited = threading.Event()  # the job's process has exited

    def raise_flag(self, flag: threading.Event) -> None:
        flag.set()
        self.wake.set()


def heartbeat_wait_s(lease_s: float) -> float:
    """A third of the lease: two heartbeats can be lost before the lease lapses."""
    return max(0.5, min(lease_s / 3, _MAX_WAIT_S))


class Heartbeat:
    """Background heartbeat for one run; raises `cancel` / `fenced` on its `RunControl`."""

    def __init__(self, http: SyncHTTP, run_id: int, lease_s: float, control: RunControl) -> None:
        self._http = http
        self._run_id = run_id
        self._lease_s = lease_s
        self._control = control
        self._stopped = threading.Event()
        self.beats = 0
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{run_id}", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating. An in-flight long-poll is left to finish in its daemon thread."""
        self._stopped.set()

    def _loop(self) -> None:
        wait_s = heartbeat_wait_s(self._lease_s)
        # Retries come quickly: a lease survives about three missed heartbeats, not more.
        backoff = Backoff(initial_s=0.5, max_s=max(1.0, self._lease_s / 6))
        while not self._stopped.is_set():
            canceled = self._control.cancel.is_set()
            started = time.monotonic()
            try:
                response = self._http.request(
                    "POST",
                    f"/v1/runs/{self._run_id}/heartbeat",
                    # After a cancel, don't long-poll: the server would answer at once, every time.
                    json={"wait_s": 0 if canceled else wait_s},
                    timeout_s=wait_s + 5,
                    retry=False,
                )
            except (ConflictError, NotFoundError, AuthenticationError, PermissionDeniedError) as e:
                if not self._stopped.is_set():
                    logger.warning(
                        "run %s: heartbeat refused (%s): fenced, the job will be stopped",
                        self._run_id,
                        e.status_code,
                    )
                    self._control.raise_flag(self._control.fenced)
                return
            except (APIConnectionError, APIStatusError) as e:
                logger.warning("run %s: heartbeat failed (%s); retrying", self._run_id, e)
                backoff.sleep(self._stopped)
                continue
            backoff.reset()
            self.beats += 1
            try:
                beat = HeartbeatResponse.model_validate(response.json())
            except ValueError:
                logger.warning("run %s: unreadable heartbeat answer", self._run_id)
                beat = None
            if beat is not None and beat.cancel and not canceled and not self._stopped.is_set():
                logger.info("run %s: cancel requested by the server", self._run_id)
                self._control.raise_flag(self._control.cancel)
            if canceled or beat is None:
                self._stopped.wait(wait_s)
            elif not beat.cancel and time.monotonic() - started < wait_s / 2:
                # A server that answers at once instead of long-polling must not make us spin.
                self._stopped.wait(wait_s - (time.monotonic() - started))
