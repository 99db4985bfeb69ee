"""`runpod`: GPU (and CPU) pods on RunPod, through its GraphQL API.

It sends the same GraphQL the `runpod` SDK sends (`podFindAndDeployOnDemand`, `deployCpuPod`,
`myself { pods }`, `pod(input)`, `podTerminate`) over httpx, with the key per provider object
instead of the SDK's process-global `runpod.api_key` (one manager process may serve several
orgs), string values escaped (the SDK pastes them in raw), and RunPod's failure answers mapped to
typed errors. The base URL comes from `base_url`, else `RUNPOD_API_BASE_URL` (as for the SDK),
else `https://api.runpod.io`; tests point it at `tests/runpod_double.py`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

import httpx

from openweights.cluster.catalog import DEFAULT_CATALOG, Catalog, Offer
from openweights.cluster.providers.base import (
    POD_NAME_PREFIX,
    NoCapacity,
    Pod,
    PodSpec,
    PodStatus,
    ProviderAuthError,
    ProviderError,
    ProviderUnavailable,
    QuotaExceeded,
    pod_created_at,
)

__all__ = ["DEFAULT_BASE_URL", "RunPodProvider", "classify_error"]

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.runpod.io"
_POD_FIELDS = (
    "id name desiredStatus imageName costPerHr gpuCount lastStatusChange "
    "machine { gpuDisplayName } runtime { uptimeInSeconds ports { ip isIpPublic privatePort "
    "publicPort type } }"
)
_NO_CAPACITY = re.compile(
    r"no longer any instances available|no (gpu|instances?|machines?) (are )?available|"
    r"not enough (free )?gpus|does not have the resources|out of capacity",
    re.IGNORECASE,
)
_QUOTA = re.compile(r"balance|spend(ing)? limit|quota|insufficient funds", re.IGNORECASE)
_AUTH = re.compile(r"unauthori[sz]ed|api key|forbidden|authenticat", re.IGNORECASE)


def classify_error(message: str) -> ProviderError:
    """A GraphQL error message of RunPod as the typed error the manager acts on."""
    if _NO_CAPACITY.search(message):
        return NoCapacity(message)
    if _QUOTA.search(message):
        return QuotaExceeded(message)
    if _AUTH.search(message):
        return ProviderAuthError(message)
    return ProviderError(message)


def _gql(value: Any) -> str:
    """A Python value as a GraphQL literal (strings escaped as JSON, which GraphQL accepts)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return json.dumps(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_gql(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_gql(v)}" for k, v in value.items()) + "}"
    if isinstance(value, _Enum):
        return value.name
    raise TypeError(f"cannot write {value!r} as GraphQL")


class _Enum:
    def __init__(self, name: str) -> None:
        self.name = name


class RunPodProvider:
    """RunPod pods. `api_key`: the org's RUNPOD_API_KEY secret."""

    name = "runpod"
    runs_images = True

    def __init__(
        self,
        api_key: str | None,
        *,
        base_url: str | None = None,
        catalog: Catalog = DEFAULT_CATALOG,
        cloud_type: str = "ALL",
        timeout_s: float = 30.0,
        ports: str = "22/tcp",
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not api_key:
            raise ProviderAuthError(
                "RUNPOD_API_KEY is not set: add it to the org's secrets (`ow env import FILE`) "
                "or to the env file given to `ow cluster --env-file`"
            )
        self.base_url = (
            base_url or os.environ.get("RUNPOD_API_BASE_URL") or DEFAULT_BASE_URL
        ).rstrip("/")
        self.catalog = catalog
        self.cloud_type = cloud_type
        self.ports = ports
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
            timeout=timeout_s,
            transport=transport,
            trust_env=False,
        )

    def close(self) -> None:
        self._http.close()

    # -- transport ------------------------------------------------------------------------------
    def _query(self, query: str) -> dict[str, Any]:
        try:
            r = self._http.post("/graphql", json={"query": query})
        except httpx.TimeoutException as e:
            raise ProviderUnavailable(f"RunPod API timed out ({self.base_url})") from e
        except httpx.TransportError as e:
            raise ProviderUnavailable(f"cannot reach the RunPod API at {self.base_url}: {e}") from e
        if r.status_code in (401, 403):
            raise ProviderAuthError(f"RunPod refused the API key ({r.status_code})")
        if r.status_code == 429:
            after = r.headers.get("retry-after")
            try:
                retry = float(after) if after else 10.0
            except ValueError:
                retry = 10.0
            raise ProviderUnavailable("RunPod API rate limit (429)", retry_after_s=retry)
        if r.status_code >= 500:
            raise ProviderUnavailable(f"RunPod API error {r.status_code}: {r.text[:200]}")
        if r.status_code >= 400:
            raise ProviderError(f"RunPod API answered {r.status_code}: {r.text[:200]}")
        try:
            body = r.json()
        except ValueError as e:
            raise ProviderUnavailable(f"RunPod API answered non-JSON: {r.text[:200]}") from e
        if body.get("errors"):
            raise classify_error(str(body["errors"][0].get("message", body["errors"][0])))
        return body.get("data") or {}

    # -- Provider -------------------------------------------------------------------------------
    def offers(self) -> list[Offer] | None:
        return None  # every catalog offer; capacity is learnt per launch

    def launch(self, spec: PodSpec) -> Pod:
        offer = spec.offer
        env = [{"key": k, "value": v} for k, v in spec.env.items()]
        if offer.gpu == "cpu":
            fields = {
                "name": spec.name,
                "imageName": spec.image,
                "instanceId": offer.runpod_id or "cpu3c-2-4",
                "cloudType": _Enum("SECURE"),
                "containerDiskInGb": spec.disk_gb,
                "startSsh": True,
                "ports": self.ports,
                "env": env,
            }
            mutation = (
                f"mutation {{ deployCpuPod(input: {_gql(fields)}) {{ id imageName machineId }} }}"
            )
            key = "deployCpuPod"
        else:
            if not offer.runpod_id:
                raise NoCapacity(f"{offer.hardware_type} has no RunPod GPU type id in the catalog")
            fields = {
                "name": spec.name,
                "imageName": spec.image,
                "gpuTypeId": offer.runpod_id,
                "cloudType": _Enum(self.cloud_type),
                "gpuCount": offer.count,
                "volumeInGb": 0,
                "containerDiskInGb": spec.disk_gb,
                "minVcpuCount": 2,
                "minMemoryInGb": 8,
                "startSsh": True,
                "supportPublicIp": True,
                "ports": self.ports,
                "volumeMountPath": "/workspace",
                "env": env,
            }
            mutation = (
                f"mutation {{ podFindAndDeployOnDemand(input: {_gql(fields)}) "
                "{ id imageName machineId machine { podHostId } } }"
            )
            key = "podFindAndDeployOnDemand"
        data = self._query(mutation)
        got = data.get(key)
        if not got or not got.get("id"):
            raise NoCapacity(f"RunPod started no pod for {offer.hardware_type}")
        return Pod(
            id=got["id"],
            name=spec.name,
            status="starting",
            hardware_type=offer.hardware_type,
            price_per_hour=offer.price_per_hour,
            image=spec.image,
            created_at=pod_created_at(spec.name),
        )

    def status(self, pod_id: str) -> Pod | None:
        data = self._query(
            f"query pod {{ pod(input: {{podId: {_gql(pod_id)}}}) {{ {_POD_FIELDS} }} }}"
        )
        raw = data.get("pod")
        return self._pod(raw) if raw else None

    def logs(self, pod_id: str, *, tail_bytes: int = 65536) -> str:
        # RunPod's API has no console logs; the worker streams job logs to the server instead.
        return ""

    def terminate(self, pod_id: str) -> None:
        try:
            self._query(f"mutation {{ podTerminate(input: {{podId: {_gql(pod_id)}}}) }}")
        except ProviderError as e:
            if "not found" in e.message.lower():
                return
            raise

    def list(self) -> list[Pod]:
        data = self._query(f"query myPods {{ myself {{ pods {{ {_POD_FIELDS} }} }} }}")
        pods = (data.get("myself") or {}).get("pods") or []
        return [self._pod(p) for p in pods if (p.get("name") or "").startswith(POD_NAME_PREFIX)]

    def _pod(self, raw: dict[str, Any]) -> Pod:
        from openweights.worker.hardware import gpu_short_name

        count = int(raw.get("gpuCount") or 0)
        display = ((raw.get("machine") or {}).get("gpuDisplayName")) or ""
        if count and display:
            gpu = self.catalog.gpu(gpu_short_name(display))
            hardware = f"{count}x {gpu.name if gpu else gpu_short_name(display)}"
        else:
            hardware = "cpu"
        desired = (raw.get("desiredStatus") or "").upper()
        status: PodStatus
        if desired == "RUNNING":
            status = "running" if raw.get("runtime") else "starting"
        elif desired in ("EXITED", "DEAD"):
            status = "exited"
        elif desired == "TERMINATED":
            status = "terminated"
        else:
            status = "unknown"
        ports = ((raw.get("runtime") or {}).get("ports")) or []
        detail = {}
        for p in ports:
            if p.get("privatePort") == 22 and p.get("isIpPublic"):
                detail = {"ssh_host": str(p.get("ip")), "ssh_port": str(p.get("publicPort"))}
        return Pod(
            id=raw["id"],
            name=raw.get("name") or "",
            status=status,
            hardware_type=hardware,
            price_per_hour=float(raw.get("costPerHr") or 0.0),
            image=raw.get("imageName") or "",
            created_at=pod_created_at(raw.get("name") or ""),
            detail=detail,
        )
