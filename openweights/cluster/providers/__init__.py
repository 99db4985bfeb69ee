"""Where pods come from: one module per provider, each implementing `base.Provider`."""

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
    "NoCapacity",
    "Pod",
    "PodSpec",
    "Provider",
    "ProviderAuthError",
    "ProviderError",
    "ProviderUnavailable",
    "QuotaExceeded",
]
