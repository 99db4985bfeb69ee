"""The GPU catalog: what hardware exists, its VRAM and its price, and which offer a job gets.

Names are the short GPU names the worker's hardware probe registers (`openweights.worker.hardware.
gpu_short_name`), so an offer `"2x A100"` is exactly the `hardware_type` its worker reports and
`allowed_hardware=["2x A100"]` matches it. Prices are on-demand USD per GPU-hour on RunPod's secure
cloud as listed in November 2026 (rounded); they move, so a deployment overrides them with
`Catalog.with_prices(...)` (`ow cluster --prices FILE`). VRAM is the nominal size, which every card's
probed size (MiB → decimal GB) meets or exceeds, so a worker claims what the manager sized it for.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from functools import cached_property, lru_cache

__all__ = [
    "CPU",
    "DEFAULT_CATALOG",
    "GPU_COUNTS",
    "Catalog",
    "GpuType",
    "Offer",
    "parse_hardware",
]

#: GPU counts auto-selection considers, fewest first: a 150 GB job gets 1x H200, a 200 GB one
#: the cheapest of 2x H200 / 4x A100 …; `allowed_hardware` may name any count.
GPU_COUNTS: tuple[int, ...] = (1, 2, 4, 8)


@dataclass(frozen=True)
class GpuType:
    """One GPU model."""

    name: str  # short name, as the worker probe registers it: "H100"
    vram_gb: float  # nominal memory of one card
    price_per_hour: float  # USD per GPU-hour, on demand
    runpod_id: str | None = None  # RunPod's gpuTypeId
    aliases: tuple[str, ...] = ()  # other names users write ("H100S": the original's SXM name)


@dataclass(frozen=True)
class Offer:
    """A pod shape: `count` GPUs of one type (or a CPU pod), with its total VRAM and price."""

    gpu: str  # short GPU name, or "cpu"
    count: int
    vram_gb: float
    price_per_hour: float
    runpod_id: str | None = None

    @property
    def hardware_type(self) -> str:
        """What its worker registers as, and what `allowed_hardware` names: `"2x A100"`."""
        return "cpu" if self.gpu == "cpu" else f"{self.count}x {self.gpu}"

    def fits(self, requires_vram_gb: float, allowed_hardware: Iterable[str] | None) -> bool:
        if allowed_hardware:
            return self.hardware_type in {normalize(h) for h in allowed_hardware}
        return requires_vram_gb <= self.vram_gb


#: A CPU pod (RunPod `cpu3c-2-4`: 2 vCPU, 4 GB): for jobs that need no GPU.
CPU = Offer(gpu="cpu", count=0, vram_gb=0.0, price_per_hour=0.06, runpod_id="cpu3c-2-4")

_GPUS: tuple[GpuType, ...] = (
    GpuType("A4500", 20, 0.25, "NVIDIA RTX A4500"),
    GpuType("RTX3090", 24, 0.43, "NVIDIA GeForce RTX 3090"),
    GpuType("A5000", 24, 0.27, "NVIDIA RTX A5000"),
    GpuType("L4", 24, 0.43, "NVIDIA L4"),
    GpuType("RTX4090", 24, 0.69, "NVIDIA GeForce RTX 4090"),
    GpuType("A40", 48, 0.44, "NVIDIA A40"),
    GpuType("A6000", 48, 0.49, "NVIDIA RTX A6000"),
    GpuType("6000Ada", 48, 0.77, "NVIDIA RTX 6000 Ada Generation"),
    GpuType("L40", 48, 0.99, "NVIDIA L40"),
    GpuType("L40S", 48, 0.86, "NVIDIA L40S"),
    GpuType("A100", 80, 1.39, "NVIDIA A100 80GB PCIe", aliases=("A100S", "A100-80GB")),
    GpuType("H100", 80, 2.69, "NVIDIA H100 80GB HBM3", aliases=("H100S", "H100N", "H100-SXM")),
    GpuType("H200", 141, 3.59, "NVIDIA H200"),
    GpuType("B200", 180, 5.99, "NVIDIA B200"),
)

_HW = re.compile(r"^\s*(\d+)\s*x\s*([A-Za-z0-9_\-]+)\s*$", re.IGNORECASE)
_ALIASES = {a.upper(): g.name for g in _GPUS for a in (g.name, *g.aliases)}


def parse_hardware(text: str) -> tuple[int, str]:
    """`"2x A100"` → `(2, "A100")`; aliases map to catalog names. ValueError names the input."""
    if text.strip().lower() == "cpu":
        return 0, "cpu"
    m = _HW.match(text)
    if not m:
        raise ValueError(
            f'allowed_hardware entry {text!r} is not of the form "<count>x <GPU>", e.g. "1x H200"'
        )
    count, gpu = int(m.group(1)), m.group(2)
    name = _ALIASES.get(gpu.upper(), gpu)
    if count < 1:
        raise ValueError(f"allowed_hardware entry {text!r}: the GPU count must be at least 1")
    return count, name


def normalize(text: str) -> str:
    """`"2x a100s"` → `"2x A100"`; unparsable text is kept (it then matches nothing)."""
    try:
        count, gpu = parse_hardware(text)
    except ValueError:
        return text
    return "cpu" if gpu == "cpu" else f"{count}x {gpu}"


@dataclass(frozen=True)
class Catalog:
    """GPU types and the offers built from them; immutable, cheap to derive variants of."""

    gpus: tuple[GpuType, ...] = _GPUS
    cpu: Offer | None = CPU
    counts: tuple[int, ...] = GPU_COUNTS

    def gpu(self, name: str) -> GpuType | None:
        name = _ALIASES.get(name.upper(), name)
        return next((g for g in self.gpus if g.name == name), None)

    def offers(self) -> list[Offer]:
        """Every pod shape, cheapest first (ties: fewer GPUs, then name)."""
        return list(self._offers)

    @cached_property
    def _offers(self) -> tuple[Offer, ...]:
        out = [self.cpu] if self.cpu else []
        for g in self.gpus:
            for n in self.counts:
                out.append(
                    Offer(g.name, n, g.vram_gb * n, round(g.price_per_hour * n, 4), g.runpod_id)
                )
        return tuple(sorted(out, key=lambda o: (o.price_per_hour, o.count, o.gpu)))

    def offer(self, hardware_type: str) -> Offer | None:
        """The offer for `"2x A100"` (any count, not only `counts`), or None when unknown."""
        try:
            count, name = parse_hardware(hardware_type)
        except ValueError:
            return None
        if name == "cpu":
            return self.cpu
        g = self.gpu(name)
        if g is None:
            return None
        return Offer(
            g.name, count, g.vram_gb * count, round(g.price_per_hour * count, 4), g.runpod_id
        )

    def candidates(
        self, requires_vram_gb: float, allowed_hardware: Iterable[str] | None
    ) -> list[Offer]:
        """Offers a job may run on, cheapest first.

        With `allowed_hardware`, exactly those shapes (unknown GPU names are skipped: the
        manager reports them), cheapest first. Without, every shape with enough VRAM, fewest
        GPUs first, then cheapest (a CPU pod first for a job needing no VRAM).
        """
        return list(_candidates(self, requires_vram_gb, tuple(allowed_hardware or ())))

    def _candidates(
        self, requires_vram_gb: float, allowed_hardware: tuple[str, ...]
    ) -> list[Offer]:
        if allowed_hardware:
            found = [self.offer(h) for h in allowed_hardware]
            uniq = {o.hardware_type: o for o in found if o is not None}
            return sorted(uniq.values(), key=lambda o: (o.price_per_hour, o.count, o.gpu))
        fitting = [o for o in self.offers() if o.fits(requires_vram_gb, None)]
        # Fewest GPUs first (most jobs do not shard a model over cards), then price; the rest
        # stay as fallbacks for when the first choices have no capacity.
        return sorted(fitting, key=lambda o: (o.count, o.price_per_hour, o.gpu))

    def with_prices(self, prices: Mapping[str, float]) -> Catalog:
        """A copy with some per-GPU-hour prices replaced (`{"H100": 2.39, "cpu": 0.1}`)."""
        gpus = tuple(
            replace(g, price_per_hour=float(prices[g.name])) if g.name in prices else g
            for g in self.gpus
        )
        unknown = set(prices) - {g.name for g in self.gpus} - {"cpu"}
        if unknown:
            raise ValueError(f"prices name unknown GPU types: {', '.join(sorted(unknown))}")
        cpu = self.cpu
        if cpu is not None and "cpu" in prices:
            cpu = replace(cpu, price_per_hour=float(prices["cpu"]))
        return replace(self, gpus=gpus, cpu=cpu)


@lru_cache(maxsize=4096)
def _candidates(
    catalog: Catalog, requires_vram_gb: float, allowed_hardware: tuple[str, ...]
) -> tuple[Offer, ...]:
    # the manager asks for every pending job on every step: answer from a cache
    return tuple(catalog._candidates(requires_vram_gb, allowed_hardware))


DEFAULT_CATALOG = Catalog()
