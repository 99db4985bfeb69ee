"""The cluster manager and its providers: pods started for queued jobs and stopped when idle.

Nothing here is imported by `import openweights`; `ow cluster` and the server's managed mode
import it when they run.
"""

from openweights.cluster.catalog import DEFAULT_CATALOG, Catalog, GpuType, Offer, parse_hardware
from openweights.cluster.manager import ClusterManager, ManagerConfig
from openweights.cluster.providers.base import (
    NoCapacity,
    Pod,
    PodSpec,
    Provider,
    ProviderAuthError,
    ProviderError,
    ProviderUnavailable,
    QuotaExceeded,
)

__all__ = [
    "DEFAULT_CATALOG",
    "Catalog",
    "ClusterManager",
    "GpuType",
    "ManagerConfig",
    "NoCapacity",
    "Offer",
    "Pod",
    "PodSpec",
    "Provider",
    "ProviderAuthError",
    "ProviderError",
    "ProviderUnavailable",
    "QuotaExceeded",
    "parse_hardware",
]
