"""The provider interface: where worker pods come from.

A provider starts a worker image with an environment, reports on it, shows its logs, stops it, and
lists the pods it started for us. That is all the manager needs, so adding a cloud (SkyPilot, a
Kubernetes namespace, a SLURM partition) is one module implementing `Provider` and mapping its
failures onto the errors below.

Errors::

    ProviderError                 anything a provider call failed with
    ├── NoCapacity                this hardware is not available now: try another offer
    ├── QuotaExceeded             the account's spend/quota limit: stop launching for a while
    ├── ProviderAuthError         the provider key is missing or refused: retrying cannot help
    └── ProviderUnavailable       timeout, 5xx, rate limit: retry the same call later
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from openweights.cluster.catalog import Offer

__all__ = [
    "POD_NAME_PREFIX",
    "NoCapacity",
    "Pod",
    "PodSpec",
    "PodStatus",
    "Provider",
    "ProviderAuthError",
    "ProviderError",
    "ProviderUnavailable",
    "QuotaExceeded",
]

#: Every pod we start is named `ow-<tag>-<epoch>-<random>`: `list()` keeps only ours, and the
#: launch time survives a manager restart.
POD_NAME_PREFIX = "ow-"

PodStatus = Literal["starting", "running", "exited", "terminated", "unknown"]


class ProviderError(Exception):
    """A provider call failed."""

    retry_after_s: float | None = None

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        if retry_after_s is not None:
            self.retry_after_s = retry_after_s


class NoCapacity(ProviderError):
    """The requested hardware is not available now."""


class QuotaExceeded(ProviderError):
    """The provider account hit a spend or quota limit."""


class ProviderAuthError(ProviderError):
    """The provider key is missing or was refused."""


class ProviderUnavailable(ProviderError):
    """The provider timed out, failed (5xx) or rate-limited us; the same call may work later."""


@dataclass(frozen=True)
class PodSpec:
    """What to start: one worker image on one offer."""

    name: str  # `ow-<tag>-<epoch>-<random>`; the worker registers under this name
    image: str
    offer: Offer
    env: Mapping[str, str]  # the pod's whole environment: server URL, worker token, flags
    disk_gb: int = 100


@dataclass(frozen=True)
class Pod:
    """A pod as the provider reports it."""

    id: str
    name: str
    status: PodStatus
    hardware_type: str  # the offer it was started on: "1x H100"
    price_per_hour: float
    image: str = ""
    created_at: float | None = None  # epoch seconds, from the name when the provider has none
    detail: dict[str, str] = field(default_factory=dict)  # provider specifics (ssh host/port…)


@runtime_checkable
class Provider(Protocol):
    """Starts, inspects and stops worker pods."""

    name: str

    def launch(self, spec: PodSpec) -> Pod:
        """Start a pod. Raises NoCapacity, QuotaExceeded, ProviderAuthError, ProviderUnavailable."""
        ...

    def status(self, pod_id: str) -> Pod | None:
        """The pod now, or None when the provider no longer knows it."""
        ...

    def logs(self, pod_id: str, *, tail_bytes: int = 65536) -> str:
        """The end of the pod's console output ("" when the provider keeps none)."""
        ...

    def terminate(self, pod_id: str) -> None:
        """Stop the pod and release what it bills; a pod already gone is not an error."""
        ...

    def list(self) -> list[Pod]:
        """Our pods (named with POD_NAME_PREFIX), whatever started them."""
        ...

    def offers(self) -> list[Offer] | None:
        """The shapes this provider can start, or None for every catalog offer."""
        ...


def pod_created_at(name: str) -> float | None:
    """The launch time encoded in a pod name (`ow-<tag>-<epoch>-<random>`)."""
    parts = name.split("-")
    try:
        return float(parts[-2])
    except (IndexError, ValueError):
        return None
