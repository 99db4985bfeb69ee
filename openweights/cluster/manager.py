"""The cluster manager: turns an org's job queue into pods, and pods back into nothing.

One loop: long-poll the server's queue view (`POST /v1/cluster/state`, woken by every queued or
requeued job), list our pods at the provider, and act:

- a pending job no idle or booting worker will take gets a pod: the cheapest catalog offer that
  satisfies its `allowed_hardware` / `requires_vram_gb`, skipping hardware on cooldown, trying the
  next offer on no capacity, within the org's `max_workers` and `max_spend_per_hour`;
- a worker idle for `idle_s` with no job for it is shut down, then its pod terminated;
- a pod whose worker never registered within `boot_deadline_s`, or stopped heartbeating, or whose
  process exited, is terminated and its worker's jobs requeued at once; its hardware's failures
  count towards a cooldown ladder.

The provider's list of our pods is the truth, so a restarted manager adopts what the previous one
started. A lease on the server (`/v1/cluster/lease`) lets one manager per org act while others
stand by. A pod gets a server URL, a worker token made for it alone (revoked when it stops) and
flags; never the user's key or the provider key: jobs get the org's secrets from the server when
they are claimed.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from openweights._exceptions import APIConnectionError, APIStatusError, NotFoundError
from openweights.client._base import SyncHTTP
from openweights.cluster.catalog import DEFAULT_CATALOG, Catalog, Offer, normalize
from openweights.cluster.providers.base import (
    POD_NAME_PREFIX,
    NoCapacity,
    Pod,
    PodSpec,
    Provider,
    ProviderAuthError,
    ProviderError,
    ProviderUnavailable,
    QuotaExceeded,
)
from openweights.types.cluster import ClusterState, ClusterWorker, PendingJob

__all__ = [
    "DEFAULT_CPU_IMAGE",
    "DEFAULT_GPU_IMAGE",
    "ClusterManager",
    "HardwareHealth",
    "ManagerConfig",
]

logger = logging.getLogger(__name__)

DEFAULT_GPU_IMAGE = "ghcr.io/openweights/ow-worker:0.1"
DEFAULT_CPU_IMAGE = "ghcr.io/openweights/ow-worker-cpu:0.1"
#: A pod the provider does not list yet (eventual consistency) still counts this long.
_RECENT_LAUNCH_S = 120.0


@dataclass
class ManagerConfig:
    """How the manager scales. Each field can come from the org's secrets or `ow cluster` flags."""

    max_workers: int = 8  # pods at once, booting ones included
    max_spend_per_hour: float | None = None  # USD/h over all our pods; None: no cap
    idle_s: float = 300.0  # stop a worker idle this long with nothing queued for it
    boot_deadline_s: float = 900.0  # a pod whose worker has not registered by then is replaced
    heartbeat_timeout_s: float = 120.0  # a registered worker silent this long is dead
    lease_ttl_s: float = 30.0  # the manager lease; renewed every loop
    max_wait_s: float = 10.0  # longest long-poll: bounds how late time-based actions happen
    worker_token_days: float = 30.0
    gpu_image: str = DEFAULT_GPU_IMAGE
    cpu_image: str = DEFAULT_CPU_IMAGE
    failure_threshold: int = 3  # failed pods of one hardware type in a row before a cooldown
    cooldown_ladder_s: tuple[float, ...] = (60, 120, 300, 600, 1200, 2400, 4800, 9600, 21600)
    no_capacity_cooldown_s: float = 60.0
    quota_pause_s: float = 300.0
    auth_pause_s: float = 300.0
    disk_gb: int = 100
    pod_env: dict[str, str] = field(default_factory=dict)  # extra flags for every pod (no secrets)
    server_url: str | None = None  # the URL pods reach the server at (default: the manager's)
    waits_ttl_s: float = 60.0  # how long a job shows the reason this manager gave (re-sent sooner)


class HardwareHealth:
    """Per hardware type: consecutive pod failures and cooldowns (a ladder that resets on success)."""

    def __init__(self, config: ManagerConfig, clock: Callable[[], float]) -> None:
        self.config = config
        self.clock = clock
        self.failures: dict[str, int] = {}
        self.level: dict[str, int] = {}
        self.until: dict[str, float] = {}

    def available(self, hardware_type: str) -> bool:
        return self.until.get(hardware_type, 0.0) <= self.clock()

    def cooldown_left_s(self, hardware_type: str) -> float:
        return max(0.0, self.until.get(hardware_type, 0.0) - self.clock())

    def failed(self, hardware_type: str) -> None:
        n = self.failures.get(hardware_type, 0) + 1
        self.failures[hardware_type] = n
        if n >= self.config.failure_threshold:
            ladder = self.config.cooldown_ladder_s
            level = self.level.get(hardware_type, 0)
            delay = ladder[min(level, len(ladder) - 1)]
            self.until[hardware_type] = self.clock() + delay
            self.level[hardware_type] = level + 1
            self.failures[hardware_type] = 0
            logger.warning(
                "hardware %s failed %d times in a row; not launching it for %.0fs",
                hardware_type,
                n,
                delay,
                extra={"action": "cooldown", "hardware": hardware_type},
            )

    def no_capacity(self, hardware_type: str) -> None:
        self.until[hardware_type] = max(
            self.until.get(hardware_type, 0.0), self.clock() + self.config.no_capacity_cooldown_s
        )

    def ok(self, hardware_type: str) -> None:
        self.failures.pop(hardware_type, None)
        self.level.pop(hardware_type, None)


@dataclass
class _Slot:
    """Capacity that will take one pending job: an idle worker or a pod still booting."""

    pod: Pod | None  # None: a worker that is not one of our pods (never stopped by us)
    worker: ClusterWorker | None
    hardware_type: str
    vram_gb: float
    image: str | None  # the image its worker registers with (None: any)
    any_hardware: bool = False
    used: bool = False

    def fits(self, job: PendingJob) -> bool:
        if self.any_hardware:
            hw_ok = True
        elif job.allowed_hardware:
            hw_ok = self.hardware_type in {normalize(h) for h in job.allowed_hardware}
        else:
            hw_ok = job.requires_vram_gb <= self.vram_gb
        image_ok = self.image is None or job.docker_image in (None, self.image)
        return hw_ok and image_ok


@dataclass
class StepReport:
    """What one step saw and did (logged; `ow cluster --once` prints it)."""

    pending: int = 0
    pods: int = 0  # ours after the step (launches included)
    spend_per_hour: float = 0.0  # of those pods
    launched: list[str] = field(default_factory=list)
    terminated: list[str] = field(default_factory=list)
    waiting: dict[str, str] = field(default_factory=dict)  # job id -> why no pod was started
    booting: dict[str, str] = field(default_factory=dict)  # job id -> the pod booting for it


class ClusterManager:
    """Scales one org's pods on one provider. `run()` blocks; `step()` acts once."""

    def __init__(
        self,
        *,
        url: str,
        api_key: str,
        provider: Provider,
        config: ManagerConfig | None = None,
        catalog: Catalog = DEFAULT_CATALOG,
        holder: str | None = None,
        clock: Callable[[], float] = time.time,
        http: SyncHTTP | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.http = http or SyncHTTP(self.url, api_key, max_retries=2)
        self.provider = provider
        self.config = config or ManagerConfig()
        self.catalog = catalog
        self.clock = clock
        self.holder = holder or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.health = HardwareHealth(self.config, clock)
        self.paused_until = 0.0
        self.pause_reason = ""
        self._stop = threading.Event()
        self._recent: dict[str, tuple[Pod, float]] = {}  # launched, maybe not listed yet
        self._tokens: dict[str, str] = {}  # pod name -> worker token id
        self._recorded: set[str] = set()  # pod ids whose listing went to /v1/cluster/pods
        self._open: dict[str, Pod] | None = None  # pods the server's `cluster_pods` has running
        # launches that failed in a way that may have started the pod: name -> (at, job, …)
        self._unsure: dict[str, tuple[float, str, Offer, str]] = {}
        self._registered: set[str] = set()  # pod ids whose worker's registration went there
        self._waits: dict[str, str] = {}  # the reasons last sent to /v1/cluster/waits
        self._waits_at = -1e18
        me = self.http.request("GET", "/v1/me").json()
        self.org_id: str = me["org"]["id"]
        self.tag = self.org_id.rsplit("-", 1)[-1][-8:].lower()
        self.prefix = f"{POD_NAME_PREFIX}{self.tag}-"
        self.last_report = StepReport()
        self._warned: set[str] = set()

    # -- loop -----------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        """Hold the org's lease and scale until `stop()`; stand by while another manager holds it."""
        version: str | None = None
        wait_s = 0.0
        errors = 0
        try:
            while not self._stop.is_set():
                try:
                    if not self.renew_lease():
                        version = None
                        self._stop.wait(min(self.config.lease_ttl_s / 3, 5.0))
                        continue
                    state = self.fetch_state(wait_s=wait_s, version=version)
                    if self._stop.is_set() or not self.renew_lease():
                        continue
                    wait_s = self.step(state)
                    version = state.version
                    errors = 0
                except (APIConnectionError, APIStatusError, ProviderError) as e:
                    errors += 1
                    delay = getattr(e, "retry_after_s", None) or min(2.0 ** (errors - 1), 30.0)
                    if isinstance(e, ProviderAuthError):
                        delay = max(delay, 60.0)  # a refused key does not fix itself quickly
                    logger.warning("manager step failed (%s); retrying in %.0fs", e, delay)
                    version = None
                    self._stop.wait(delay)
                except Exception:  # a bug in one step must not leave the org's pods unmanaged
                    errors += 1
                    logger.exception("manager step crashed; retrying")
                    version = None
                    self._stop.wait(min(2.0 ** (errors - 1), 30.0))
        finally:
            self._clear_waits()
            self.release_lease()

    def _clear_waits(self) -> None:
        """No manager, no manager's reasons: the server's own show. Only while this manager
        holds the lease, so a stale one never wipes its successor's."""
        if not self._waits:
            return
        try:
            held = self.renew_lease()
        except (APIConnectionError, APIStatusError):
            return  # they expire by themselves
        if held:
            self._send_waits({}, force=True)

    def renew_lease(self) -> bool:
        body = {"holder": self.holder, "ttl_s": self.config.lease_ttl_s}
        r = self.http.request("POST", "/v1/cluster/lease", json=body, retry=True).json()
        if not r["held"] and f"standby:{r['holder']}" not in self._warned:
            self._warned.add(f"standby:{r['holder']}")
            logger.info("manager %s holds this org's lease; standing by", r["holder"])
        return bool(r["held"])

    def release_lease(self) -> None:
        try:
            body = {"holder": self.holder, "ttl_s": self.config.lease_ttl_s}
            self.http.request("POST", "/v1/cluster/lease/release", json=body, timeout_s=5)
        except (APIConnectionError, APIStatusError) as e:
            logger.info("could not release the manager lease (%s); it expires by itself", e)

    def fetch_state(self, *, wait_s: float = 0.0, version: str | None = None) -> ClusterState:
        wait_s = max(0.0, min(wait_s, self.config.max_wait_s, self.config.lease_ttl_s / 3, 60.0))
        r = self.http.request(
            "POST",
            "/v1/cluster/state",
            json={"wait_s": wait_s, "version": version},
            timeout_s=wait_s + 30,
            retry=True,
        )
        return ClusterState.model_validate(r.json())

    # -- one step -------------------------------------------------------------------------------
    def step(self, state: ClusterState | None = None) -> float:
        """Act once on the queue and our pods; return how long until something is due."""
        if state is None:
            state = self.fetch_state()
        report = StepReport(pending=state.pending_total)
        now = self.clock()
        next_s = self.config.max_wait_s
        pods = [p for p in self.provider.list() if p.name.startswith(self.prefix)]
        for pod in pods:  # adopted or just listed: its row has the provider's own price
            if pod.id not in self._recorded and pod.status not in ("exited", "terminated"):
                extra: dict[str, Any] = {"token_id": self._token_id(pod.name)}
                if pod.name in self._unsure:  # the launch that timed out did start it
                    extra["job_id"] = self._unsure[pod.name][1]
                    logger.info("pod %s started after all; adopting it", pod.name)
                if self._record(pod, launched_at=pod.created_at, **extra):
                    self._recorded.add(pod.id)
            self._unsure.pop(pod.name, None)
        listed = {p.name for p in pods}
        self._close_vanished(pods, now)
        for name, (pod, at) in list(self._recent.items()):
            if name in listed or now - at > _RECENT_LAUNCH_S:
                self._recent.pop(name)
            else:
                pods.append(pod)
        workers: dict[str, ClusterWorker] = {}
        for w in state.workers:  # oldest first: a re-registration wins
            workers[w.name] = w

        slots: list[_Slot] = []
        live: list[Pod] = []
        for pod in pods:
            w = workers.get(pod.name)
            age = now - (pod.created_at or now)
            if pod.status in ("exited", "terminated"):
                if w is None:
                    self.health.failed(pod.hardware_type)
                self._terminate(pod, w, f"pod {pod.name} stopped ({pod.status})", report)
                continue
            if w is None:
                if age > self.config.boot_deadline_s:
                    self.health.failed(pod.hardware_type)
                    tail = self._log_tail(pod)
                    self._terminate(
                        pod,
                        None,
                        f"its worker did not register within {self.config.boot_deadline_s:.0f}s"
                        + (f"; last output: {tail}" if tail else ""),
                        report,
                    )
                    continue
                next_s = min(next_s, self.config.boot_deadline_s - age + 0.5)
                live.append(pod)
                slots.append(self._booting_slot(pod))
                continue
            if pod.id not in self._registered:
                if self._record(pod, registered_at=w.created_at, worker_id=w.id):
                    self._registered.add(pod.id)
            silent = state.now - w.last_seen_at
            if w.status == "active" and silent > self.config.heartbeat_timeout_s:
                self._terminate(
                    pod, w, f"worker {w.id} sent no heartbeat for {silent:.0f}s", report
                )
                continue
            self.health.ok(pod.hardware_type)
            if w.status != "active":
                if w.current_run_id is None:
                    self._terminate(pod, w, f"worker {w.id} stopped", report)
                    continue
                live.append(pod)  # draining its last job
                continue
            live.append(pod)
            next_s = min(next_s, self.config.heartbeat_timeout_s - silent + 0.5)
            if w.current_run_id is None:
                slots.append(
                    _Slot(
                        pod,
                        w,
                        w.hardware_type,
                        w.vram_gb,
                        w.docker_image,
                        any_hardware=w.any_hardware,
                    )
                )

        # Workers named as ours whose pod is gone (preempted, removed by hand): requeue now.
        # Other live idle workers (a user's own `ow worker`) are capacity too: no pod for what
        # they will take.
        pod_names = {p.name for p in pods}
        for w in state.workers:
            if w.status != "active" or w.name in pod_names:
                continue
            if w.name.startswith(self.prefix):
                self._lose(w, f"its pod {w.name} is gone")
            elif (
                w.current_run_id is None
                and state.now - w.last_seen_at < self.config.heartbeat_timeout_s
            ):
                slots.append(
                    _Slot(None, w, w.hardware_type, w.vram_gb, w.docker_image, w.any_hardware)
                )

        for name, (at, _job_id, offer, image) in list(self._unsure.items()):
            if now - at > _RECENT_LAUNCH_S:
                self._unsure.pop(name)
                self._revoke_token(name)  # it never showed up: it was not started
                continue
            slots.append(
                _Slot(
                    None,
                    None,
                    offer.hardware_type,
                    offer.vram_gb,
                    image if self._runs_images() else None,
                )
            )
        unmatched = self._match(state.pending, slots, report)
        next_s = min(next_s, self._stop_idle(state, slots, report))
        report.pods = len(live)
        report.spend_per_hour = round(sum(p.price_per_hour for p in live), 4)
        next_s = min(next_s, self._launch(unmatched, live, report))
        self.last_report = report
        self._send_waits({**report.booting, **report.waiting})
        if report.launched or report.terminated:
            logger.info(
                "pending %d, pods %d (%.2f USD/h); launched %s; terminated %s",
                report.pending,
                report.pods,
                report.spend_per_hour,
                report.launched or "-",
                report.terminated or "-",
            )
        return max(0.0, next_s)

    def _booting_slot(self, pod: Pod) -> _Slot:
        offer = self._offer(pod.hardware_type)
        image = pod.image if self._runs_images() else None
        any_hw = self.config.pod_env.get("OW_ANY_HARDWARE", "").lower() in {"1", "true", "yes"}
        return _Slot(pod, None, pod.hardware_type, offer.vram_gb if offer else 0.0, image, any_hw)

    def _match(
        self, pending: list[PendingJob], slots: list[_Slot], report: StepReport
    ) -> list[PendingJob]:
        """Pending jobs that no idle worker or booting pod will take, oldest first. A job prefers
        an idle worker that has its model cached."""
        unmatched = []
        for job in pending:
            free = [s for s in slots if not s.used and s.fits(job)]
            if not free:
                unmatched.append(job)
                continue
            warm = [
                s for s in free if s.worker and job.model and job.model in s.worker.cached_models
            ]
            idle = [s for s in free if s.worker]
            slot = (warm or idle or free)[0]
            slot.used = True
            if slot.worker is None:
                report.booting[job.id] = self._booting_reason(slot)
        return unmatched

    def _booting_reason(self, slot: _Slot) -> str:
        if slot.pod is None:
            return f"a {slot.hardware_type} pod may have started for it (its launch timed out)"
        since = time.strftime("%H:%M:%S", time.gmtime(slot.pod.created_at or self.clock()))
        return (
            f"pod {slot.pod.name} ({slot.hardware_type}) is booting for it since {since} UTC "
            f"(replaced if its worker has not registered {self.config.boot_deadline_s:.0f}s after)"
        )

    def _stop_idle(self, state: ClusterState, slots: list[_Slot], report: StepReport) -> float:
        next_s = self.config.max_wait_s
        for s in slots:
            if s.used or s.worker is None or s.pod is None:
                continue
            idle_for = state.now - s.worker.idle_since
            if idle_for < self.config.idle_s:
                next_s = min(next_s, self.config.idle_s - idle_for + 0.5)
                continue
            try:
                r = self.http.request("POST", f"/v1/workers/{s.worker.id}/shutdown", retry=True)
            except NotFoundError:
                r = None
            if r is not None and r.json().get("current_run_id") is not None:
                continue  # it took a job just now: it drains, then stops
            self._terminate(s.pod, None, f"idle for {idle_for:.0f}s", report)
        return next_s

    def _launch(self, jobs: list[PendingJob], live: list[Pod], report: StepReport) -> float:
        now = self.clock()
        if not jobs:
            return self.config.max_wait_s
        if now < self.paused_until:
            for j in jobs:
                report.waiting[j.id] = self.pause_reason
            return self.paused_until - now
        count = len(live)
        spend = sum(p.price_per_hour for p in live)
        next_s = self.config.max_wait_s
        for job in jobs:
            cands = self._candidates(job)
            if not cands:  # first: no limit being lifted would help it
                report.waiting[job.id] = self._no_fit_reason(job)
                continue
            if count >= self.config.max_workers:
                report.waiting[job.id] = (
                    f"max_workers reached: {count} of {self.config.max_workers} pods run"
                )
                continue
            why = ""
            for offer in cands:
                hw = offer.hardware_type
                if not self.health.available(hw):
                    left = self.health.cooldown_left_s(hw)
                    next_s = min(next_s, left + 0.5)
                    why = why or f"{hw} is cooling down for {left:.0f}s after failures"
                    continue
                cap = self.config.max_spend_per_hour
                if cap is not None and spend + offer.price_per_hour > cap + 1e-9:
                    why = why or (
                        f"spend cap: {spend:.2f} USD/h running, {hw} costs "
                        f"{offer.price_per_hour:.2f} USD/h, cap {cap:.2f} USD/h"
                    )
                    continue
                try:
                    pod = self._start(job, offer)
                except NoCapacity as e:
                    self.health.no_capacity(hw)
                    why = f"no capacity for {hw}: {e.message}"
                    continue
                except QuotaExceeded as e:
                    self._pause(self.config.quota_pause_s, f"provider quota: {e.message}")
                    return self._paused(jobs, report, self.config.quota_pause_s)
                except ProviderAuthError as e:
                    self._pause(self.config.auth_pause_s, f"provider refused the key: {e.message}")
                    return self._paused(jobs, report, self.config.auth_pause_s)
                except ProviderUnavailable as e:
                    delay = e.retry_after_s or 10.0
                    self._pause(delay, f"provider unavailable: {e.message}")
                    return self._paused(jobs, report, delay)
                except ProviderError as e:
                    self.health.failed(hw)
                    why = f"launching {hw} failed: {e.message}"
                    continue
                count += 1
                spend += offer.price_per_hour
                report.pods = count  # the step's report counts what it launched
                report.spend_per_hour = round(spend, 4)
                report.launched.append(
                    f"{pod.name} ({hw}, {offer.price_per_hour:.2f} USD/h) for {job.id}"
                )
                report.booting[job.id] = (
                    f"pod {pod.name} ({hw}, {offer.price_per_hour:.2f} USD/h) was launched for it"
                )
                break
            else:
                report.waiting[job.id] = why or "no offer could be started"
                if job.id not in self._warned:
                    self._warned.add(job.id)
                    logger.warning("job %s waits: %s", job.id, report.waiting[job.id])
        return next_s

    def _paused(self, jobs: list[PendingJob], report: StepReport, delay_s: float) -> float:
        for j in jobs:  # every job not launched this step waits for the same reason
            if j.id not in report.booting:
                report.waiting[j.id] = self.pause_reason
        return delay_s

    def _pause(self, delay_s: float, reason: str) -> None:
        self.paused_until = self.clock() + delay_s
        self.pause_reason = reason
        logger.warning("not launching pods for %.0fs: %s", delay_s, reason)

    def _candidates(self, job: PendingJob) -> list[Offer]:
        available = self.provider.offers()
        if available is not None:
            any_hw = self.config.pod_env.get("OW_ANY_HARDWARE", "").lower() in {"1", "true", "yes"}
            return [
                o for o in available if any_hw or o.fits(job.requires_vram_gb, job.allowed_hardware)
            ]
        return self.catalog.candidates(job.requires_vram_gb, job.allowed_hardware)

    def _no_fit_reason(self, job: PendingJob) -> str:
        if job.allowed_hardware:
            unknown = [h for h in job.allowed_hardware if self.catalog.offer(h) is None]
            if unknown:
                return f"allowed_hardware names hardware the catalog does not know: {unknown}"
            return f"provider {self.provider.name} offers none of {job.allowed_hardware}"
        return f"no hardware of provider {self.provider.name} has {job.requires_vram_gb:g} GB VRAM"

    def _offer(self, hardware_type: str) -> Offer | None:
        available = self.provider.offers()
        if available is not None:
            return next((o for o in available if o.hardware_type == hardware_type), None)
        return self.catalog.offer(hardware_type)

    def _runs_images(self) -> bool:
        return bool(getattr(self.provider, "runs_images", True))

    # -- pods -----------------------------------------------------------------------------------
    def _start(self, job: PendingJob, offer: Offer) -> Pod:
        now = self.clock()
        name = f"{self.prefix}{int(now)}-{uuid.uuid4().hex[:6]}"
        image = job.docker_image or (
            self.config.cpu_image if offer.gpu == "cpu" else self.config.gpu_image
        )
        token = self.http.request(
            "POST",
            "/v1/tokens",
            json={"name": name, "kind": "worker", "expires_in_days": self.config.worker_token_days},
            retry=True,
        ).json()
        self._tokens[name] = token["id"]
        register_image = image if self._runs_images() else job.docker_image
        env = {
            **self.config.pod_env,
            "OPENWEIGHTS_URL": self.config.server_url or self.url,
            "OPENWEIGHTS_API_KEY": token["token"],
            "OW_WORKER_NAME": name,
            "OW_PROVIDER": self.provider.name,
        }
        if register_image:
            env["OW_DOCKER_IMAGE"] = register_image
        spec = PodSpec(name=name, image=image, offer=offer, env=env, disk_gb=self.config.disk_gb)
        try:
            pod = self.provider.launch(spec)
        except ProviderUnavailable:
            # A timeout or 5xx may come after the provider started the pod: keep its token and
            # count it for the job until the listing shows it (adopted) or long enough not to.
            self._unsure[name] = (now, job.id, offer, image)
            raise
        except BaseException:
            self._revoke_token(name)
            raise
        self._recent[name] = (pod, now)
        self._record(pod, token_id=token["id"], job_id=job.id)
        logger.info(
            "launched %s on %s (%s, %.2f USD/h) for job %s",
            name,
            self.provider.name,
            offer.hardware_type,
            offer.price_per_hour,
            job.id,
            extra={"action": "launch", "pod": name, "job_id": job.id},
        )
        return pod

    def _lose(self, worker: ClusterWorker, reason: str) -> None:
        try:
            r = self.http.request(
                "POST", f"/v1/cluster/workers/{worker.id}/lose", json={"reason": reason}, retry=True
            ).json()
        except NotFoundError:
            return
        for j in r["jobs"]:
            logger.warning(
                "job %s lost its worker %s (%s); it is now %s",
                j["id"],
                worker.id,
                reason,
                j["status"],
            )

    def _terminate(
        self, pod: Pod, worker: ClusterWorker | None, reason: str, report: StepReport
    ) -> None:
        logger.info(
            "terminating %s: %s", pod.name, reason, extra={"action": "terminate", "pod": pod.name}
        )
        self.provider.terminate(pod.id)
        self._recent.pop(pod.name, None)
        if worker is not None and (worker.status == "active" or worker.current_run_id is not None):
            self._lose(worker, f"its pod was terminated: {reason}")
        self._revoke_token(pod.name)
        self._record(pod, terminated=True, termination_reason=reason)
        if self._open is not None:
            self._open.pop(pod.id, None)
        self._recorded.discard(pod.id)
        self._registered.discard(pod.id)
        report.terminated.append(f"{pod.name} ({reason})")

    def _token_id(self, name: str) -> str | None:
        """The worker token made for this pod (by a previous manager, for an adopted one)."""
        if name not in self._tokens:
            try:
                tokens = self.http.request("GET", "/v1/tokens").json()["data"]
            except (APIConnectionError, APIStatusError):
                return None
            for t in tokens:
                if t["name"] == name and t.get("kind") == "worker" and not t.get("revoked_at"):
                    self._tokens[name] = t["id"]
        return self._tokens.get(name)

    def _revoke_token(self, name: str) -> None:
        token_id = self._tokens.pop(name, None)
        try:
            if token_id is None:
                tokens = self.http.request("GET", "/v1/tokens").json()["data"]
                ids = [t["id"] for t in tokens if t["name"] == name and not t.get("revoked_at")]
            else:
                ids = [token_id]
            for tid in ids:
                self.http.request("DELETE", f"/v1/tokens/{tid}", retry=True)
        except (APIConnectionError, APIStatusError) as e:
            logger.warning("could not revoke the worker token of %s (%s); it expires", name, e)

    def _log_tail(self, pod: Pod) -> str:
        try:
            text = self.provider.logs(pod.id, tail_bytes=2000)
        except ProviderError:
            return ""
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        return " | ".join(lines[-3:])[:500]

    def _record(self, pod: Pod, **fields: Any) -> bool:
        """Report a pod to the server's `cluster_pods` (billed time); True when it took it. A
        failed report is retried by the next step's listing, never a reason to stop scaling."""
        body = {
            "provider": self.provider.name,
            "pod_id": pod.id,
            "name": pod.name,
            "hardware_type": pod.hardware_type,
            "price_per_hour": pod.price_per_hour,
            "image": pod.image or None,
            **fields,
        }
        try:
            self.http.request("POST", "/v1/cluster/pods", json=body, retry=True)
            return True
        except (APIConnectionError, APIStatusError) as e:
            logger.warning("could not record pod %s (%s)", pod.name, e)
            return False

    def _close_vanished(self, pods: list[Pod], now: float) -> None:
        """Pods the server has running that the provider no longer lists (preempted, deleted by
        hand, ended while no manager ran): their billed time ends now."""
        if self._open is None:  # once per manager: what a previous one left open
            try:
                rows = self.http.request(
                    "GET", "/v1/cluster/pods", params={"running": "true"}, retry=True
                ).json()["data"]
            except (APIConnectionError, APIStatusError) as e:
                logger.warning("could not read this org's pods from the server (%s)", e)
                return
            self._open = {
                r["pod_id"]: Pod(
                    id=r["pod_id"],
                    name=r["name"],
                    status="running",
                    hardware_type=r["hardware_type"],
                    price_per_hour=r["price_per_hour"],
                    image=r.get("image") or "",
                    created_at=r["launched_at"],
                )
                for r in rows
                if r["provider"] == self.provider.name and r["name"].startswith(self.prefix)
            }
        listed = {p.id for p in pods}
        for pod in pods:
            if pod.status not in ("exited", "terminated"):
                self._open.setdefault(pod.id, pod)
        recent = {p.id for p, _ in self._recent.values()}
        for pod_id, pod in list(self._open.items()):
            if pod_id in listed or pod_id in recent:
                continue
            if self._record(
                pod, terminated=True, termination_reason="the provider lists it no more"
            ):
                self._open.pop(pod_id, None)
                self._recorded.discard(pod_id)
                self._registered.discard(pod_id)

    def _send_waits(self, reasons: dict[str, str], *, force: bool = False) -> None:
        """Tell the server why each job waits (its `pending_reason`); only when the reasons
        changed, or before the last ones expire."""
        ttl = self.config.waits_ttl_s
        now = self.clock()
        if not force and reasons == self._waits and now - self._waits_at < ttl / 2:
            return
        if not force and not reasons and not self._waits and self._waits_at > -1e18:
            return  # nothing to say, and the server holds nothing of ours (cleared once at start)
        try:
            self.http.request(
                "POST", "/v1/cluster/waits", json={"reasons": reasons, "ttl_s": ttl}, retry=True
            )
        except (APIConnectionError, APIStatusError) as e:
            logger.warning("could not send why jobs wait (%s)", e)
            return
        self._waits, self._waits_at = dict(reasons), now

    def terminate_all(self, reason: str = "manager shut down its pods") -> list[str]:
        """Terminate every pod of this org (`ow cluster --stop-pods`, tests' cleanup)."""
        state = self.fetch_state()
        workers = {w.name: w for w in state.workers}
        report = StepReport()
        for pod in self.provider.list():
            if pod.name.startswith(self.prefix):
                self._terminate(pod, workers.get(pod.name), reason, report)
        return report.terminated


def config_from_secrets(values: Mapping[str, str], base: ManagerConfig) -> ManagerConfig:
    """Apply the org's OW_MAX_WORKERS / OW_MAX_SPEND_PER_HOUR / OW_IDLE_S secrets to a config."""
    from dataclasses import replace

    out = base
    try:
        if values.get("OW_MAX_WORKERS"):
            out = replace(out, max_workers=int(values["OW_MAX_WORKERS"]))
        if values.get("OW_MAX_SPEND_PER_HOUR"):
            out = replace(out, max_spend_per_hour=float(values["OW_MAX_SPEND_PER_HOUR"]))
        if values.get("OW_IDLE_S"):
            out = replace(out, idle_s=float(values["OW_IDLE_S"]))
    except ValueError as e:
        raise ValueError(f"invalid cluster secret value: {e}") from e
    return out
