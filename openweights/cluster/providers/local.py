"""`local`: worker processes on this machine (its GPUs, or its CPU).

A pod is an `ow worker` process in its own process group. Each one has a small record under
`state_dir` (pid, process start time, offer, log path), so a manager that restarts finds the
workers the previous one started (`list()`), and a recycled pid is never mistaken for one of ours.
The image is not run (there is no container here): the worker runs the installed openweights and
registers with the image name, so it takes exactly the jobs of that image.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from openweights.cluster.catalog import Offer
from openweights.cluster.providers.base import (
    POD_NAME_PREFIX,
    NoCapacity,
    Pod,
    PodSpec,
    ProviderError,
    pod_created_at,
)
from openweights.types import Hardware

__all__ = ["LocalProvider", "local_offer"]

logger = logging.getLogger(__name__)

_NEVER_INHERITED = (
    "OPENWEIGHTS_URL",
    "OPENWEIGHTS_API_KEY",
    "OPENWEIGHTS_DATABASE_URL",
    "OPENWEIGHTS_STORAGE_URL",
    "OPENWEIGHTS_SECRET_KEY",
    "RUNPOD_API_KEY",
)


_HAS_PROC = Path("/proc/self/stat").exists()


def local_offer(hardware: Hardware) -> Offer:
    """This machine as an offer (price 0: it is already paid for)."""
    if not hardware.gpu_count:
        return Offer(gpu="cpu", count=0, vram_gb=0.0, price_per_hour=0.0)
    return Offer(
        gpu=hardware.gpu_type or "GPU",
        count=hardware.gpu_count,
        vram_gb=hardware.vram_gb,
        price_per_hour=0.0,
    )


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks): tells a recycled pid apart.
    Without /proc (macOS), "?" for a live pid: a recycled one is not told apart there."""
    if not _HAS_PROC:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return "?"
        return "?"
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None  # a zombie is dead
    return fields[19]


class LocalProvider:
    """Worker processes on this machine."""

    name = "local"

    def __init__(
        self,
        state_dir: str | Path,
        *,
        hardware: Hardware | None = None,
        max_pods: int | None = None,
        worker_args: Sequence[str] = (),
        python: str = sys.executable,
        stop_grace_s: float = 15.0,
        base_env: dict[str, str] | None = None,
        exclude: Sequence[str] = (),
        own_session: bool = True,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if hardware is None:
            from openweights.worker.hardware import probe_hardware

            hardware = probe_hardware()
        self.hardware = hardware
        # one worker per GPU box by default: two would fight over its memory
        self.max_pods = max_pods if max_pods is not None else 1
        self.worker_args = list(worker_args)
        self.python = python
        self.stop_grace_s = stop_grace_s
        if base_env is None:
            # Never hand the manager's credentials to a worker (the pod env carries its own
            # token), nor provider keys or what came from the manager's env file (`exclude`).
            drop = set(_NEVER_INHERITED) | set(exclude)
            base_env = {k: v for k, v in os.environ.items() if k not in drop}
        self.base_env = base_env
        # own_session: a worker outlives its manager (adopted by the next one). The embedded
        # service's pool passes False: its workers stop with the service's process group.
        self.own_session = own_session
        self._children: dict[str, subprocess.Popen] = {}

    # -- Provider -------------------------------------------------------------------------------
    def offers(self) -> list[Offer]:
        return [local_offer(self.hardware)]

    def launch(self, spec: PodSpec) -> Pod:
        offer = local_offer(self.hardware)
        if spec.offer.hardware_type != offer.hardware_type:
            raise NoCapacity(
                f"this machine is {offer.hardware_type}; it cannot run a {spec.offer.hardware_type} pod"
            )
        running = [p for p in self.list() if p.status == "running"]
        if len(running) >= self.max_pods:
            raise NoCapacity(
                f"this machine already runs {len(running)} of {self.max_pods} local workers"
            )
        log = self.state_dir / f"{spec.name}.log"
        env = {**self.base_env, **spec.env}
        cmd = [self.python, "-m", "openweights.worker", "--name", spec.name, "--provider", "local"]
        if env.get("OW_DOCKER_IMAGE"):
            cmd += ["--docker-image", env["OW_DOCKER_IMAGE"]]
        if env.get("OW_ANY_HARDWARE", "").lower() in {"1", "true", "yes"}:
            cmd.append("--any-hardware")
        cmd += self.worker_args
        try:
            with open(log, "ab") as out:
                proc = subprocess.Popen(
                    cmd,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=self.state_dir,
                    start_new_session=self.own_session,  # terminate reaches its jobs too
                )
        except OSError as e:
            raise ProviderError(f"cannot start a local worker: {e}") from e
        self._children[spec.name] = proc
        record = {
            "id": spec.name,
            "pid": proc.pid,
            "start": _start_time(proc.pid),
            "hardware_type": spec.offer.hardware_type,
            "image": spec.image,
            "log": str(log),
            "created_at": time.time(),
        }
        tmp = self.state_dir / f".{spec.name}.json"
        tmp.write_text(json.dumps(record))
        tmp.replace(self.state_dir / f"{spec.name}.json")
        logger.info("started local worker %s (pid %d)", spec.name, proc.pid)
        return self._pod(record)

    def process(self, pod_id: str) -> subprocess.Popen | None:
        """The process of a worker this provider object started (to wait on it)."""
        return self._children.get(pod_id)

    def status(self, pod_id: str) -> Pod | None:
        record = self._record(pod_id)
        return None if record is None else self._pod(record)

    def logs(self, pod_id: str, *, tail_bytes: int = 65536) -> str:
        record = self._record(pod_id)
        if record is None:
            return ""
        try:
            with open(record["log"], "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - tail_bytes))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def terminate(self, pod_id: str) -> None:
        record = self._record(pod_id)
        if record is None:
            return
        pid = record["pid"]
        if self._alive(record):
            # SIGTERM first: the worker gives its job back (`lost`) so it is requeued at once
            self._signal(pid, signal.SIGTERM)
            deadline = time.monotonic() + self.stop_grace_s
            while self._alive(record) and time.monotonic() < deadline:
                self._reap(pod_id)
                time.sleep(0.05)  # waiting on another process's exit: nothing to be woken by
            if self._alive(record):
                self._signal(pid, signal.SIGKILL)
        self._reap(pod_id, block=True)
        (self.state_dir / f"{pod_id}.json").unlink(missing_ok=True)
        logger.info("stopped local worker %s", pod_id)

    def list(self) -> list[Pod]:
        pods = []
        for path in sorted(self.state_dir.glob(f"{POD_NAME_PREFIX}*.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            pods.append(self._pod(record))
        return pods

    # -- helpers --------------------------------------------------------------------------------
    def _record(self, pod_id: str) -> dict | None:
        try:
            return json.loads((self.state_dir / f"{pod_id}.json").read_text())
        except (OSError, ValueError):
            return None

    def _reap(self, pod_id: str, block: bool = False) -> None:
        proc = self._children.get(pod_id)
        if proc is None:
            return
        if block:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                return
        if proc.poll() is not None:
            self._children.pop(pod_id, None)

    def _alive(self, record: dict) -> bool:
        self._reap(record["id"])
        return record.get("start") is not None and _start_time(record["pid"]) == record["start"]

    def _signal(self, pid: int, sig: int) -> None:
        try:
            if self.own_session:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _pod(self, record: dict) -> Pod:
        alive = self._alive(record)
        return Pod(
            id=record["id"],
            name=record["id"],
            status="running" if alive else "exited",
            hardware_type=record["hardware_type"],
            price_per_hour=0.0,
            image=record.get("image", ""),
            created_at=record.get("created_at") or pod_created_at(record["id"]),
            detail={"pid": str(record["pid"]), "log": record["log"]},
        )
