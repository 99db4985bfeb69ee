"""Run one claimed job from start to reported completion.

The supervising thread makes every decision (kill, status, report); helper threads only raise
flags on a `RunControl`: the heartbeat (cancel, fenced), the log sender (fenced) and the process
waiter (exited). That keeps the order of events simple: a 409 from anywhere kills the job at once
and nothing is reported; a cancel or deadline kills it gracefully (SIGTERM, grace, SIGKILL) and is
reported; a worker shutdown waits a grace for the job, then gives it back as `lost`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import httpx

from openweights._exceptions import (
    APIConnectionError,
    APIStatusError,
    ConflictError,
    InternalServerError,
    RateLimitError,
)
from openweights.client._base import SyncHTTP
from openweights.types import ClaimResponse, EventCreate, FileObject, RunCompleteRequest, RunDone
from openweights.worker._env import build_job_env
from openweights.worker._heartbeat import Heartbeat, RunControl
from openweights.worker._logship import LogShipper
from openweights.worker._mounts import MountError, download_mounts
from openweights.worker._process import (
    describe_returncode,
    normalize_exit_code,
    spawn_job,
    terminate_group,
)
from openweights.worker._retry import Backoff

__all__ = ["RunOptions", "RunResult", "RunSupervisor"]

logger = logging.getLogger(__name__)

CompleteStatus = Literal["completed", "failed", "canceled", "lost"]

_ERROR_TAIL_BYTES = 2048
_UPLOAD_ATTEMPTS = 4
_UPLOAD_CHUNK = 1 << 20
_EVENTS_PER_REQUEST = 10_000
#: Output that says the machine, not the job's code, is at fault.
_INFRA_PATTERNS = re.compile(
    r"CUDA error|CUDA out of memory|CUDA driver|NCCL error|No space left on device|"
    r"cudaErrorUnknown|ECC error|Xid",
    re.IGNORECASE,
)


@dataclass
class RunOptions:
    """Per-worker knobs that shape how each run is supervised."""

    url: str
    workdir: Path
    n_gpus: int = 0
    cancel_grace_s: float = 5.0
    shutdown_grace_s: float = 10.0
    leftover_grace_s: float = 2.0
    finalize_timeout_s: float = 300.0
    keep_run_dirs: bool = False
    echo: IO[bytes] | None = None
    base_env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    worker_tokens: tuple[str, ...] = ()
    transport: httpx.BaseTransport | None = None
    #: Hand the final status to the worker's next claim (`RunResult.deferred`, sent as the
    #: claim's `done`) instead of posting it here: one round trip per job. Not when stopping.
    defer_complete: bool = False


@dataclass
class RunResult:
    """How a run ended, from the worker's side."""

    run_id: int
    job_id: str
    status: CompleteStatus | None  # what we reported; None when fenced before reporting
    exit_code: int | None = None
    error: str | None = None
    accepted: bool = False  # the server took our `complete`
    fenced: bool = False
    infra_failure: bool = False
    duration_s: float = 0.0
    #: The completion the worker's next claim carries (`RunOptions.defer_complete`); `accepted`
    #: is set when the server has taken it.
    deferred: RunDone | None = None


class _Fenced(Exception):
    """The run was fenced while we were finishing it: stop, report nothing."""


@dataclass
class _Outcome:
    status: CompleteStatus
    exit_code: int | None = None
    error: str | None = None
    infra: bool = False
    upload: bool = True


class RunSupervisor:
    """Executes one `ClaimResponse`; `current_pgid` lets a second worker signal kill the job."""

    def __init__(
        self, http: SyncHTTP, claim: ClaimResponse, options: RunOptions, control: RunControl
    ):
        self.http = http  # worker token: heartbeat, logs, complete
        self.claim = claim
        self.options = options
        self.control = control
        self.run_id = claim.run.id
        self.job_id = claim.job.id
        self.run_dir = options.workdir / f"run-{self.run_id}"
        self.log_path = options.workdir / f"run-{self.run_id}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        # Results and their events go up under the run token: exactly what the job itself may
        # do. (A header on the worker's one client: a second httpx.Client per run costs ~30 ms.)
        self._run_auth = {"Authorization": f"Bearer {claim.token}"}

    # ---- top level ----------------------------------------------------------------------------
    def execute(self) -> RunResult:
        started = time.monotonic()
        ids = {"run_id": self.run_id, "job_id": self.job_id}
        logger.info(
            "run %s: starting job %s",
            self.run_id,
            self.job_id,
            extra={"action": "run_start", **ids},
        )
        heartbeat = Heartbeat(self.http, self.run_id, self.claim.lease_s, self.control).start()
        result = RunResult(run_id=self.run_id, job_id=self.job_id, status=None)
        try:
            outcome = self._run()
            if self.control.fenced.is_set():
                result.fenced, result.infra_failure = True, True
                return result
            if outcome.upload and outcome.status in ("completed", "failed"):
                outcome = self._upload_outputs(outcome)
            if self.control.fenced.is_set():
                result.fenced, result.infra_failure = True, True
                return result
            result.status, result.exit_code, result.error = (
                outcome.status,
                outcome.exit_code,
                outcome.error,
            )
            result.infra_failure = outcome.infra
            if self.options.defer_complete and not self.control.stop.is_set():
                result.deferred = RunDone(run_id=self.run_id, **self._complete_body(outcome))
                return result
            result.accepted = self._complete(outcome)
            if not result.accepted:
                result.fenced = self.control.fenced.is_set()
                result.infra_failure = True
            return result
        finally:
            heartbeat.stop()
            result.duration_s = time.monotonic() - started
            if result.deferred is None:
                self._cleanup()
            else:  # the completion must not wait for a big run directory to be deleted
                threading.Thread(target=self._cleanup, name=f"cleanup-{self.run_id}").start()
            logger.info(
                "run %s: done status=%s accepted=%s fenced=%s in %.1fs",
                self.run_id,
                result.status,
                "with the next claim" if result.deferred else result.accepted,
                result.fenced,
                result.duration_s,
                extra={"action": "run_end", "status": result.status, **ids},
            )

    def _run(self) -> _Outcome:
        try:
            self._prepare()
        except MountError as e:
            logger.warning("run %s: mount failed: %s", self.run_id, e)
            if e.infra:  # transient: give the job back so another attempt can try
                return _Outcome("lost", error=f"mount: {e}", infra=True, upload=False)
            return _Outcome("failed", error=f"mount: {e}", upload=False)
        except OSError as e:
            logger.warning("run %s: preparing the run directory failed: %s", self.run_id, e)
            return _Outcome(
                "lost", error=f"worker: cannot prepare run directory: {e}", infra=True, upload=False
            )
        if self.control.fenced.is_set():
            return _Outcome("lost", upload=False)
        if self.control.cancel.is_set():
            return _Outcome("canceled", error="canceled before start", upload=False)

        env = build_job_env(
            self.options.base_env,
            self.claim,
            url=self.options.url,
            n_gpus=self.options.n_gpus,
            worker_tokens=self.options.worker_tokens,
        )
        try:
            self.proc = spawn_job(self.claim.job.script, cwd=self.run_dir, env=env)
        except OSError as e:
            logger.error("run %s: cannot start the job: %s", self.run_id, e)
            return _Outcome(
                "failed",
                error=f"worker: cannot start the job's script: {e}",
                infra=True,
                upload=False,
            )
        assert self.proc.stdout is not None
        shipper = LogShipper(
            self.http,
            self.run_id,
            self.proc.stdout,
            self.log_path,
            on_fenced=lambda: self.control.raise_flag(self.control.fenced),
            echo=self.options.echo,
        ).start()
        threading.Thread(target=self._wait_exit, name=f"waiter-{self.run_id}", daemon=True).start()

        outcome = self._supervise(self.proc)
        if self.control.fenced.is_set():
            shipper.abandon()
            return outcome
        # Whatever the job left running in its group (a daemonised server, a stuck dataloader)
        # would hold the GPU for the next job.
        if terminate_group(self.proc, grace_s=self.options.leftover_grace_s):
            logger.info("run %s: killed processes the job left behind", self.run_id)
        flush_s = self._finalize_budget_s()
        if not shipper.close(eof_timeout_s=5.0, flush_timeout_s=min(60.0, flush_s)):
            logger.warning("run %s: the server may not hold the whole log", self.run_id)
        if outcome.status == "failed" and outcome.error:
            tail = shipper.tail(_ERROR_TAIL_BYTES)
            outcome.error = _with_tail(outcome.error, tail)
            outcome.infra = outcome.infra or bool(_INFRA_PATTERNS.search(tail))
        return outcome

    def _wait_exit(self) -> None:
        assert self.proc is not None
        self.proc.wait()
        self.control.raise_flag(self.control.exited)

    # ---- preparing ----------------------------------------------------------------------------
    def _prepare(self) -> None:
        """A fresh run directory with the mounted files and an empty `uploads/`."""
        if self.run_dir.exists():
            shutil.rmtree(self.run_dir)
        self.run_dir.mkdir(parents=True)
        self.log_path.unlink(missing_ok=True)
        mounts = (self.claim.job.params or {}).get("mounted_files")
        # Worker token: the contract lets it "read files of jobs it runs".
        size = download_mounts(self.http, self.run_dir, mounts)
        (self.run_dir / "uploads").mkdir(exist_ok=True)
        if mounts:
            logger.info("run %s: mounted %d files (%d bytes)", self.run_id, len(mounts), size)

    # ---- supervising --------------------------------------------------------------------------
    def _supervise(self, proc: subprocess.Popen[bytes]) -> _Outcome:
        control = self.control
        started = time.monotonic()
        timeout_s = self.claim.job.timeout_s
        deadline = started + timeout_s if timeout_s else None
        stop_deadline: float | None = None
        while True:
            now = time.monotonic()
            waits = [t - now for t in (deadline, stop_deadline) if t is not None]
            control.wake.wait(max(0.0, min(waits)) if waits else None)
            control.wake.clear()
            now = time.monotonic()
            if control.fenced.is_set():
                # Another attempt may own the job now: stop at once, report nothing.
                terminate_group(proc, grace_s=0, sig=signal.SIGKILL)
                logger.warning("run %s: fenced; job killed, completion not reported", self.run_id)
                return _Outcome("lost", upload=False)
            if control.exited.is_set():
                code = proc.returncode
                assert code is not None
                if code == 0:
                    return _Outcome("completed", exit_code=0)
                # SIGKILL we did not send is most often the kernel's OOM killer.
                return _Outcome(
                    "failed",
                    exit_code=normalize_exit_code(code),
                    error=describe_returncode(code),
                    infra=code == -signal.SIGKILL,
                )
            if control.cancel.is_set():
                self._kill(proc, "canceled")
                return _Outcome("canceled", exit_code=_code(proc), error="canceled", upload=False)
            if deadline is not None and now >= deadline:
                self._kill(proc, "deadline")
                return _Outcome(
                    "failed",
                    exit_code=_code(proc),
                    error=f"deadline: the job ran longer than its timeout_s={timeout_s:g}s and was killed",
                )
            if control.stop.is_set():
                if stop_deadline is None:
                    stop_deadline = now + self.options.shutdown_grace_s
                    logger.info(
                        "run %s: worker stopping; waiting up to %gs for the job",
                        self.run_id,
                        self.options.shutdown_grace_s,
                    )
                elif now >= stop_deadline:
                    self._kill(proc, "worker shutdown")
                    return _Outcome(
                        "lost",
                        exit_code=_code(proc),
                        error="worker shut down before the job finished; requeued",
                        upload=False,
                    )

    def _kill(self, proc: subprocess.Popen[bytes], why: str) -> None:
        forced = terminate_group(proc, grace_s=self.options.cancel_grace_s)
        logger.info(
            "run %s: job stopped (%s)%s", self.run_id, why, " with SIGKILL" if forced else ""
        )

    def _finalize_budget_s(self) -> float:
        # A stopping worker must not hang on a dead server; a healthy one can afford patience.
        budget = self.options.finalize_timeout_s
        return min(30.0, budget) if self.control.stop.is_set() else budget

    # ---- outputs ------------------------------------------------------------------------------
    def _upload_outputs(self, outcome: _Outcome) -> _Outcome:
        """Upload every file under `uploads/` and record one event per file, in one batch."""
        events: list[EventCreate] = []
        try:
            for path in _files_under(self.run_dir / "uploads"):
                if self.control.fenced.is_set():
                    return outcome
                rel = path.relative_to(self.run_dir).as_posix()
                file_obj = self._upload_file(path, rel)
                events.append(
                    EventCreate(data={"path": rel, "file": file_obj.id}, file=file_obj.id)
                )
            if events:
                self._post_events(events)
                logger.info("run %s: uploaded %d result files", self.run_id, len(events))
        except (ConflictError, _Fenced):
            self.control.raise_flag(self.control.fenced)
        except (APIStatusError, APIConnectionError, OSError) as e:
            logger.error("run %s: uploading results failed: %s", self.run_id, e)
            error = f"upload: {e}"
            if outcome.error:
                error = f"{outcome.error}\n{error}"
            return _Outcome("failed", exit_code=outcome.exit_code, error=error[:9000], infra=True)
        return outcome

    def _upload_file(self, path: Path, rel: str) -> FileObject:
        def send() -> httpx.Response:
            return self.http.request(
                "POST",
                "/v1/files",
                params={"purpose": "result", "filename": rel},
                content=_iter_file(path),  # streamed: result files can be many GB
                # A known length makes httpx stream without chunked encoding.
                headers={
                    **self._run_auth,
                    "Content-Type": "application/octet-stream",
                    "Content-Length": str(path.stat().st_size),
                },
                timeout_s=600,
                retry=False,
            )

        return FileObject.model_validate(self._retrying(f"upload of {rel}", send).json())

    def _post_events(self, events: list[EventCreate]) -> None:
        for i in range(0, len(events), _EVENTS_PER_REQUEST):
            body = {
                "events": [
                    e.model_dump(exclude_none=True) for e in events[i : i + _EVENTS_PER_REQUEST]
                ]
            }
            self._retrying(
                "events",
                lambda body=body: self.http.request(
                    "POST",
                    f"/v1/runs/{self.run_id}/events",
                    json=body,
                    headers=self._run_auth,
                    timeout_s=60,
                    retry=False,
                ),
            )

    def _retrying(
        self, what: str, send: Callable[[], httpx.Response], *, attempts: int = _UPLOAD_ATTEMPTS
    ) -> httpx.Response:
        """Resend on transport errors and 5xx; give up early when the run gets fenced."""
        backoff = Backoff(initial_s=1.0, max_s=15.0)
        for attempt in range(attempts):
            try:
                return send()
            except (APIConnectionError, InternalServerError, RateLimitError) as e:
                if attempt == attempts - 1:
                    raise
                logger.warning("run %s: %s failed (%s); retrying", self.run_id, what, e)
                if backoff.sleep(self.control.fenced):
                    raise _Fenced from e
        raise AssertionError("unreachable")

    # ---- reporting ----------------------------------------------------------------------------
    @staticmethod
    def _complete_body(outcome: _Outcome) -> dict[str, Any]:
        return RunCompleteRequest(
            status=outcome.status,
            exit_code=outcome.exit_code,
            error=outcome.error[:10_000] if outcome.error else None,
        ).model_dump()

    def _complete(self, outcome: _Outcome) -> bool:
        """Report the final status; retry until accepted, fenced, or out of time."""
        body = self._complete_body(outcome)
        deadline = time.monotonic() + self._finalize_budget_s()
        backoff = Backoff(initial_s=0.5, max_s=15.0)
        while True:
            try:
                self.http.request(
                    "POST", f"/v1/runs/{self.run_id}/complete", json=body, timeout_s=60, retry=False
                )
                return True
            except ConflictError:
                logger.warning(
                    "run %s: completion refused (409): another attempt owns the job", self.run_id
                )
                self.control.raise_flag(self.control.fenced)
                return False
            except (APIConnectionError, InternalServerError, RateLimitError) as e:
                if time.monotonic() >= deadline:
                    logger.error(
                        "run %s: could not report %s (%s); the lease will requeue the job",
                        self.run_id,
                        outcome.status,
                        e,
                    )
                    return False
                logger.warning(
                    "run %s: reporting %s failed (%s); retrying", self.run_id, outcome.status, e
                )
                backoff.sleep()
            except APIStatusError as e:
                logger.error("run %s: completion rejected: %s", self.run_id, e)
                return False

    # ---- cleanup ------------------------------------------------------------------------------
    def _cleanup(self) -> None:
        if self.options.keep_run_dirs:
            logger.info("run %s: keeping %s", self.run_id, self.run_dir)
            return
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.log_path.unlink(missing_ok=True)


def _code(proc: subprocess.Popen[bytes]) -> int | None:
    return normalize_exit_code(proc.returncode) if proc.returncode is not None else None


def _with_tail(error: str, tail: str) -> str:
    tail = tail.strip("\n")
    return f"{error}\n--- last output ---\n{tail}" if tail else error


def _files_under(root: Path) -> Iterator[Path]:
    """Regular files below `root`, sorted, without following directory symlinks."""
    if not root.is_dir():
        return
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_file():
                found.append(path)
    yield from sorted(found)


def _iter_file(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(_UPLOAD_CHUNK):
            yield chunk
