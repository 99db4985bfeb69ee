"""`ow.cluster`: what GPUs cost and when they come — before a job (`estimate`), while it waits
(`estimate(job_id=…)`, with the cluster manager's reason) and after (`costs`, `pods`)."""

from __future__ import annotations

from typing import Any

from openweights.client._resource import AsyncResource, SyncResource
from openweights.types.cluster import ClusterPod, CostReport, Estimate

__all__ = ["AsyncCluster", "Cluster"]


def _estimate_body(
    requires_vram_gb: float,
    allowed_hardware: list[str] | None,
    docker_image: str | None,
    job_id: str | None,
) -> dict[str, Any]:
    return {
        "requires_vram_gb": requires_vram_gb,
        "allowed_hardware": allowed_hardware,
        "docker_image": docker_image,
        "job_id": job_id,
    }


def _params(**kw: Any) -> dict[str, Any]:
    return {
        k: ("true" if v is True else "false" if v is False else v)
        for k, v in kw.items()
        if v is not None
    }


class Cluster(SyncResource):
    """`ow.cluster`."""

    def estimate(
        self,
        *,
        requires_vram_gb: float = 0,
        allowed_hardware: list[str] | None = None,
        docker_image: str | None = None,
        job_id: str | None = None,
    ) -> Estimate:
        """The hardware, price per hour and likely wait of a job to create, or of `job_id`."""
        body = _estimate_body(requires_vram_gb, allowed_hardware, docker_image, job_id)
        r = self._http.request("POST", "/v1/cluster/estimate", json=body)
        return Estimate.model_validate(r.json())

    def costs(self, *, since: float | None = None, job_id: str | None = None) -> CostReport:
        """Cost per run, job, day and org: busy time, and pod time billed."""
        r = self._http.request(
            "GET", "/v1/cluster/costs", params=_params(since=since, job_id=job_id)
        )
        return CostReport.model_validate(r.json())

    def pods(self, *, since: float | None = None, running: bool | None = None) -> list[ClusterPod]:
        """The org's pods (newest first) with billed time and cost."""
        r = self._http.request(
            "GET", "/v1/cluster/pods", params=_params(since=since, running=running)
        )
        return [ClusterPod.model_validate(d) for d in r.json()["data"]]


class AsyncCluster(AsyncResource):
    """`ow.cluster` of `AsyncOpenWeights`."""

    async def estimate(
        self,
        *,
        requires_vram_gb: float = 0,
        allowed_hardware: list[str] | None = None,
        docker_image: str | None = None,
        job_id: str | None = None,
    ) -> Estimate:
        """The hardware, price per hour and likely wait of a job to create, or of `job_id`."""
        body = _estimate_body(requires_vram_gb, allowed_hardware, docker_image, job_id)
        r = await self._http.request("POST", "/v1/cluster/estimate", json=body)
        return Estimate.model_validate(r.json())

    async def costs(self, *, since: float | None = None, job_id: str | None = None) -> CostReport:
        """Cost per run, job, day and org: busy time, and pod time billed."""
        params = _params(since=since, job_id=job_id)
        r = await self._http.request("GET", "/v1/cluster/costs", params=params)
        return CostReport.model_validate(r.json())

    async def pods(
        self, *, since: float | None = None, running: bool | None = None
    ) -> list[ClusterPod]:
        """The org's pods (newest first) with billed time and cost."""
        params = _params(since=since, running=running)
        r = await self._http.request("GET", "/v1/cluster/pods", params=params)
        return [ClusterPod.model_validate(d) for d in r.json()["data"]]
