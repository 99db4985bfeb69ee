"""The worker process: register, long-poll for jobs, run them one at a time, shut down cleanly.

Unlike the original (poll every 5 s, shut itself down after 5 failures), it waits on the server's
long-poll with no sleep between jobs, survives server restarts with capped backoff, and on
SIGTERM/SIGINT stops claiming, lets a running job finish within a grace, else gives it back
(`lost`) so the server requeues it at once instead of waiting for the lease.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import IO, Any

import httpx

from openweights._exceptions import (
    APIConnectionError,
    APIStatusError,
    AuthenticationError,
    ConflictError,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
)
from openweights._settings import Settings
from openweights.client._base import SyncHTTP
from openweights.types import (
    ClaimResponse,
    Hardware,
    RunCompleteRequest,
    WorkerObject,
    WorkerRegister,
)
from openweights.worker._heartbeat import RunControl
from openweights.worker._retry import Backoff
from openweights.worker.hardware import probe_cached_models, probe_hardware
from openweights.worker.runner import RunOptions, RunResult, RunSupervisor

__all__ = ["EXIT_AUTH", "EXIT_OK", "Worker", "run_worker"]

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_AUTH = 2  # the server refused our token: retrying cannot help

CLAIM_WAIT_S = 30.0
INFRA_FAILURE_WARN_AFTER = 5
_CLAIM_HTTP_MARGIN_S = 15.0
_STOP_CLAIM_JOIN_S = 3.0


class _FatalError(Exception):
    """Stop the worker with this exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class _Reregister(Exception):
    """The server no longer knows this worker (404 on claim)."""


class Worker:
    """One worker process. `run()` blocks until it stops and returns the exit code."""

    def __init__(
        self,
        *,
        url: str,
        token: str,
        name: str | None = None,
        any_hardware: bool = False,
        docker_image: str | None = None,
        max_jobs: int | None = None,
        workdir: str | Path | None = None,
        idle_exit_s: float | None = None,
        cancel_grace_s: float | None = None,
        shutdown_grace_s: float = 10.0,
        claim_wait_s: float = CLAIM_WAIT_S,
        keep_run_dirs: bool | None = None,
        echo_job_output: bool = False,
        provider: str = "local",
        hardware: Hardware | None = None,
        settings: Settings | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not url:
            raise ValueError("url is required: the openweights server the worker claims jobs from")
        if not token:
            raise ValueError("token is required: a worker or user token (`ow_…`) for that server")
        self.settings = settings or Settings()
        self.url = url.rstrip("/")
        self._tokens = [token]
        self.name = (name or f"{socket.gethostname()}-{os.getpid()}")[:200]
        self.any_hardware = any_hardware
        self.docker_image = docker_image
        self.max_jobs = max_jobs
        self.idle_exit_s = idle_exit_s
        self.cancel_grace_s = (
            self.settings.cancel_grace_s if cancel_grace_s is None else cancel_grace_s
        )
        self.shutdown_grace_s = shutdown_grace_s
        self.claim_wait_s = claim_wait_s
        self.keep_run_dirs = _keep_run_dirs_default() if keep_run_dirs is None else keep_run_dirs
        self.echo: IO[bytes] | None = (
            getattr(sys.stdout, "buffer", None) if echo_job_output else None
        )
        self.provider = provider
        self.hardware = hardware
        self._transport = transport
        self._workdir_arg = Path(workdir) if workdir is not None else None
        self.workdir: Path | None = None
        self._own_workdir = False

        self.http = SyncHTTP(self.url, token, max_retries=0, transport=transport)
        self.worker: WorkerObject | None = None
        self.jobs_done = 0
        self.infra_failures_in_a_row = 0
        self.results: list[RunResult] = []

        self._stop = threading.Event()
        self._wake = threading.Event()
        self._stop_reason = ""
        self._shutdown_sent = False
        self._current: RunSupervisor | None = None
        # The last run, when its completion rides with the next claim (`ClaimRequest.done`).
        self._done: RunResult | None = None
        self._done_deadline = 0.0
        # Capped low: after a server restart the worker is back within seconds.
        self._claim_backoff = Backoff(initial_s=0.5, max_s=10.0)

    # ---- control ------------------------------------------------------------------------------
    def request_stop(self, reason: str = "requested") -> None:
        """Stop claiming; a running job gets `shutdown_grace_s` to finish. Thread-safe."""
        if not self._stop.is_set():
            self._stop_reason = reason
            logger.info("worker stopping (%s)", reason, extra={"action": "stop"})
        self._stop.set()
        self._wake.set()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self._stop.is_set():
            # Second signal: the operator wants out now. The lease requeues the job.
            current = self._current
            if current is not None and current.proc is not None:
                try:
                    os.killpg(current.proc.pid, signal.SIGKILL)
                except OSError:
                    pass
            logger.warning("second %s: exiting immediately", name)
            os._exit(128 + signum)
        self.request_stop(f"received {name}")

    # ---- main loop ----------------------------------------------------------------------------
    def run(self) -> int:
        previous = self._install_signal_handlers()
        try:
            self._setup_workdir()
            self._register()
            self._loop()
            return EXIT_OK
        except _FatalError as e:
            logger.log(
                logging.INFO if e.code == EXIT_OK else logging.ERROR, "worker stopped: %s", e
            )
            return e.code
        except Exception:
            logger.exception("worker crashed")
            return EXIT_ERROR
        finally:
            self._shutdown()
            self._restore_signal_handlers(previous)

    def _loop(self) -> None:
        idle_since = time.monotonic()
        while not self._stop.is_set():
            if self.max_jobs is not None and self.jobs_done >= self.max_jobs:
                logger.info("ran %d jobs (max_jobs); stopping", self.jobs_done)
                return
            wait_s = self.claim_wait_s
            if self.idle_exit_s is not None:
                remaining = self.idle_exit_s - (time.monotonic() - idle_since)
                if remaining <= 0:
                    logger.info("idle for %.0fs (idle_exit_s); stopping", self.idle_exit_s)
                    return
                wait_s = min(wait_s, remaining)
            try:
                claim = self._claim(wait_s)
            except _Reregister:
                logger.warning("server does not know worker %s; registering again", self._worker_id)
                self._register()
                continue
            if claim is None:
                continue
            self._execute(claim)
            idle_since = time.monotonic()

    # ---- registering --------------------------------------------------------------------------
    @property
    def _worker_id(self) -> str | None:
        return self.worker.id if self.worker else None

    def _register(self) -> None:
        if self.hardware is None:
            self.hardware = probe_hardware()
        body = WorkerRegister(
            name=self.name,
            hardware=self.hardware,
            docker_image=self.docker_image,
            any_hardware=self.any_hardware,
            cached_models=probe_cached_models(),
            provider=self.provider,
        ).model_dump()
        backoff = Backoff(initial_s=0.5, max_s=30.0)
        while not self._stop.is_set():
            try:
                response = self.http.request("POST", "/v1/workers", json=body, retry=False)
            except (AuthenticationError, PermissionDeniedError) as e:
                raise _FatalError(
                    f"the server refused the worker token: {e.message}", EXIT_AUTH
                ) from e
            except (APIConnectionError, InternalServerError, RateLimitError) as e:
                logger.warning("cannot register at %s (%s); retrying", self.url, e)
                backoff.sleep(self._stop)
                continue
            except APIStatusError as e:
                raise _FatalError(f"registration rejected: {e.message}", EXIT_AUTH) from e
            self.worker = WorkerObject.model_validate(response.json())
            if self.worker.token:
                # The server minted this worker its own scoped token: use it from now on.
                self._tokens.append(self.worker.token)
                self.http.close()
                self.http = SyncHTTP(
                    self.url, self.worker.token, max_retries=0, transport=self._transport
                )
            logger.info(
                "registered worker %s (%s) as %s",
                self.worker.id,
                self.name,
                self.hardware.hardware_type,
                extra={"action": "register", "worker_id": self.worker.id},
            )
            return
        raise _FatalError("stopped before registering", EXIT_OK)

    # ---- claiming -----------------------------------------------------------------------------
    def _claim(self, wait_s: float) -> ClaimResponse | None:
        """Long-poll for a job in a helper thread, so a signal is acted on at once. The claim
        carries the last run's completion, if it is still to be told."""
        done = self._done
        call = _BackgroundCall(self._claim_once, wait_s, done, on_done=self._wake.set)
        while not call.done.is_set():
            self._wake.wait()
            self._wake.clear()
            if self._stop.is_set() and not call.done.is_set():
                # Tell the server first, so it stops assigning to us; then collect a claim that
                # raced with the stop and give it straight back.
                self._post_shutdown()
                if not call.done.wait(_STOP_CLAIM_JOIN_S):
                    return None  # still long-polling: its daemon thread dies with the process
                try:
                    late, settled = call.get()
                except Exception:
                    return None
                if settled:
                    self._done = None
                if late is not None:
                    self._give_back(late, "worker stopped while claiming")
                return None
        claim, settled = call.get()
        if settled:
            self._done = None
        if claim is not None and self._stop.is_set():
            self._give_back(claim, "worker stopped while claiming")
            return None
        return claim

    def _claim_once(
        self, wait_s: float, done: RunResult | None
    ) -> tuple[ClaimResponse | None, bool]:
        """(the claim or None, whether `done` is settled: taken, refused, or given up on)."""
        assert self.worker is not None
        body: dict[str, Any] = {"wait_s": wait_s}
        if done is not None and done.deferred is not None:
            body["done"] = done.deferred.model_dump()
        try:
            response = self.http.request(
                "POST",
                f"/v1/workers/{self.worker.id}/claim",
                json=body,
                timeout_s=wait_s + _CLAIM_HTTP_MARGIN_S,
                retry=False,
            )
        except (APIConnectionError, InternalServerError, RateLimitError) as e:
            self._claim_failed(e)
            return None, self._done_expired(done)
        except APIStatusError as e:
            if done is not None and (e.param or "").split(".")[0] == "done":
                self._done_refused(done, e)
                return None, True
            self._claim_refused(e)
            return None, done is None
        self._claim_backoff.reset()
        if done is not None:
            done.accepted = True
        if response.status_code == 204:
            return None, True
        return ClaimResponse.model_validate(response.json()), True

    def _claim_refused(self, e: APIStatusError) -> None:
        if isinstance(e, (AuthenticationError, PermissionDeniedError)):
            raise _FatalError(f"the server refused the worker token: {e.message}", EXIT_AUTH) from e
        if isinstance(e, NotFoundError):
            raise _Reregister() from e
        if isinstance(e, ConflictError):
            # The server shut this worker down (e.g. the cluster manager scaled it in).
            self.request_stop(f"server refused claims: {e.message}")
        else:
            self._claim_failed(e)

    def _done_refused(self, done: RunResult, error: APIStatusError) -> None:
        if isinstance(error, ConflictError):
            logger.warning(
                "run %s: completion refused (409): another attempt owns the job", done.run_id
            )
            done.fenced = True
        else:
            logger.error("run %s: completion rejected: %s", done.run_id, error)
        done.infra_failure = True

    def _done_expired(self, done: RunResult | None) -> bool:
        """Whether to stop telling the server `done` (its lease requeues the job instead)."""
        if done is None or time.monotonic() < self._done_deadline:
            return done is None
        logger.error(
            "run %s: could not report %s; the lease will requeue the job", done.run_id, done.status
        )
        done.infra_failure = True
        return True

    def _flush_done(self) -> None:
        """Tell the server the last run's completion on its own (the worker claims no more)."""
        done, self._done = self._done, None
        if done is None or done.deferred is None:
            return
        body = done.deferred.model_dump(exclude={"run_id"})
        try:
            self.http.request(
                "POST", f"/v1/runs/{done.run_id}/complete", json=body, timeout_s=30, retry=True
            )
            done.accepted = True
        except ConflictError as e:
            self._done_refused(done, e)
        except (APIConnectionError, APIStatusError) as e:
            logger.warning(
                "run %s: could not report %s (%s); its lease will requeue the job",
                done.run_id,
                done.status,
                e,
            )

    def _claim_failed(self, error: Exception) -> None:
        delay = self._claim_backoff.next_delay_s()
        logger.warning("claim failed (%s); retrying in %.1fs", error, delay)
        self._stop.wait(delay)

    # ---- running ------------------------------------------------------------------------------
    def _execute(self, claim: ClaimResponse) -> None:
        assert self.workdir is not None and self.hardware is not None
        logger.info(
            "claimed job %s (run %s, attempt %d)",
            claim.job.id,
            claim.run.id,
            claim.run.attempt,
            extra={"action": "claim", "job_id": claim.job.id, "run_id": claim.run.id},
        )
        options = RunOptions(
            url=self.url,
            workdir=self.workdir,
            n_gpus=self.hardware.gpu_count,
            cancel_grace_s=self.cancel_grace_s,
            shutdown_grace_s=self.shutdown_grace_s,
            keep_run_dirs=self.keep_run_dirs,
            echo=self.echo,
            base_env=dict(os.environ),
            worker_tokens=tuple(self._tokens),
            transport=self._transport,
            # the next claim carries this run's completion, unless this is the last job
            defer_complete=self.max_jobs is None or self.jobs_done + 1 < self.max_jobs,
        )
        # `_wake` is not cleared here: a stop that raced with the claim must still be seen.
        supervisor = RunSupervisor(self.http, claim, options, RunControl(self._wake, self._stop))
        self._current = supervisor
        try:
            result = supervisor.execute()
        finally:
            self._current = None
        self.jobs_done += 1
        self.results.append(result)
        if result.deferred is not None:
            self._done = result
            self._done_deadline = time.monotonic() + options.finalize_timeout_s
        self._count_failure(result)

    def _count_failure(self, result: RunResult) -> None:
        if not result.infra_failure:
            self.infra_failures_in_a_row = 0
            return
        self.infra_failures_in_a_row += 1
        if self.infra_failures_in_a_row >= INFRA_FAILURE_WARN_AFTER:
            # The original shut itself down here; a worker that stays up can still be drained
            # by an operator, one that exits silently loses capacity.
            logger.warning(
                "%d jobs in a row failed for reasons that look like this machine's "
                "(last: run %s, %s); check the worker's GPU, disk and network",
                self.infra_failures_in_a_row,
                result.run_id,
                (result.error or "fenced").splitlines()[0][:200],
                extra={"action": "infra_failures", "count": self.infra_failures_in_a_row},
            )

    def _give_back(self, claim: ClaimResponse, why: str) -> None:
        """Report a claimed but unstarted run as `lost` so the server requeues it now."""
        body = RunCompleteRequest(status="lost", error=why).model_dump()
        try:
            self.http.request(
                "POST", f"/v1/runs/{claim.run.id}/complete", json=body, timeout_s=10, retry=True
            )
            logger.info("gave back job %s (run %s): %s", claim.job.id, claim.run.id, why)
        except (APIConnectionError, APIStatusError) as e:
            logger.warning(
                "could not give back run %s (%s); its lease will requeue it", claim.run.id, e
            )

    # ---- lifecycle helpers --------------------------------------------------------------------
    def _setup_workdir(self) -> None:
        if self._workdir_arg is not None:
            self._workdir_arg.mkdir(parents=True, exist_ok=True)
            self.workdir = self._workdir_arg
            return
        base = self.settings.home / "worker"
        try:
            base.mkdir(parents=True, exist_ok=True)
            self.workdir = Path(tempfile.mkdtemp(prefix="w-", dir=base))
        except OSError:
            self.workdir = Path(tempfile.mkdtemp(prefix="openweights-worker-"))
        self._own_workdir = True

    def _post_shutdown(self) -> None:
        if self._shutdown_sent or self.worker is None:
            return
        self._shutdown_sent = True
        try:
            self.http.request(
                "POST", f"/v1/workers/{self.worker.id}/shutdown", timeout_s=10, retry=True
            )
            logger.info("worker %s shut down", self.worker.id, extra={"action": "shutdown"})
        except (APIConnectionError, APIStatusError) as e:
            logger.warning("could not tell the server worker %s shut down: %s", self.worker.id, e)

    def _shutdown(self) -> None:
        self._stop.set()
        self._flush_done()
        self._post_shutdown()
        self.http.close()
        if self._own_workdir and self.workdir is not None and not self.keep_run_dirs:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}  # embedded use from a thread: the caller stops us with request_stop()
        previous: dict[int, Any] = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, self._on_signal)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict[int, Any]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _BackgroundCall:
    """`fn(*args)` in a daemon thread: unlike a ThreadPoolExecutor's, a long-poll left in flight
    never keeps the process alive at exit."""

    def __init__(self, fn: Callable[..., Any], *args: Any, on_done: Callable[[], None]) -> None:
        self.done = threading.Event()
        self._result: Any = None
        self._error: BaseException | None = None
        self._fn, self._args, self._on_done = fn, args, on_done
        threading.Thread(target=self._run, name="claim", daemon=True).start()

    def _run(self) -> None:
        try:
            self._result = self._fn(*self._args)
        except BaseException as e:  # handed to the caller by get()
            self._error = e
        finally:
            self.done.set()
            self._on_done()

    def get(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._result


def _keep_run_dirs_default() -> bool:
    # Debugging switch, read here until Settings grows a field for it.
    return os.environ.get("OPENWEIGHTS_KEEP_RUN_DIRS", "").strip().lower() in {"1", "true", "yes"}


def run_worker(
    *,
    url: str,
    token: str,
    name: str | None = None,
    any_hardware: bool = False,
    docker_image: str | None = None,
    max_jobs: int | None = None,
    workdir: str | Path | None = None,
    idle_exit_s: float | None = None,
    cancel_grace_s: float | None = None,
    shutdown_grace_s: float = 10.0,
    echo_job_output: bool = False,
    provider: str = "local",
) -> int:
    """Run a worker until it is stopped (signal, `max_jobs`, `idle_exit_s`); return the exit code.

    0: stopped normally; 2: the server refused the token; 1: unexpected error.
    """
    return Worker(
        url=url,
        token=token,
        name=name,
        any_hardware=any_hardware,
        docker_image=docker_image,
        max_jobs=max_jobs,
        workdir=workdir,
        idle_exit_s=idle_exit_s,
        cancel_grace_s=cancel_grace_s,
        shutdown_grace_s=shutdown_grace_s,
        echo_job_output=echo_job_output,
        provider=provider,
    ).run()
