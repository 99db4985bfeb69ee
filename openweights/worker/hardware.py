"""Hardware probe: what this worker offers to the claim query.

Fast and dependency-free on purpose: it shells out to `nvidia-smi` instead of importing torch, so a
worker registers in milliseconds and a CPU-only install never pulls CUDA libraries.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from openweights.types import Hardware

__all__ = [
    "GpuInfo",
    "gpu_short_name",
    "parse_nvidia_smi",
    "probe",
    "model_cache_dir",
    "probe_cached_models",
    "probe_hardware",
]

logger = logging.getLogger(__name__)

#: Asked of nvidia-smi. `index` and `uuid` let us honour CUDA_VISIBLE_DEVICES.
NVIDIA_SMI_QUERY = "index,uuid,name,memory.total"
_NVIDIA_SMI_TIMEOUT_S = 15.0

# Ordered: the first pattern that matches the upper-cased marketing name wins, so more specific names
# (L40S before L40, GH200 before H200) come first.
_GPU_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"\bGH200\b", "GH200"),
    (r"\bGB200\b", "GB200"),
    (r"\bH200\b", "H200"),
    (r"\bH100\b", "H100"),
    (r"\bH800\b", "H800"),
    (r"\bB200\b", "B200"),
    (r"\bB100\b", "B100"),
    (r"\bA100\b", "A100"),
    (r"\bA800\b", "A800"),
    (r"\bL40S\b", "L40S"),
    (r"\bL40\b", "L40"),
    (r"\bL4\b", "L4"),
    (r"RTX PRO 6000", "RTXPRO6000"),
    (r"RTX 6000 ADA", "6000Ada"),
    (r"RTX 5000 ADA", "5000Ada"),
    (r"RTX 4000 ADA", "4000Ada"),
    (r"\bRTX A(\d{4})\b", "A{0}"),
    (r"\bRTX (\d{4})\b", "RTX{0}"),
    (r"\bA40\b", "A40"),
    (r"\bA30\b", "A30"),
    (r"\bA10G\b", "A10G"),
    (r"\bA10\b", "A10"),
    (r"\bA16\b", "A16"),
    (r"\bA2\b", "A2"),
    (r"\bV100\b", "V100"),
    (r"\bP100\b", "P100"),
    (r"\bT4\b", "T4"),
)


@dataclass(frozen=True)
class GpuInfo:
    """One row of nvidia-smi output."""

    index: int
    uuid: str | None
    name: str
    memory_mib: float


def gpu_short_name(name: str) -> str:
    """Map an nvidia-smi name ("NVIDIA H100 80GB HBM3") to the short type `allowed_hardware` uses."""
    upper = " ".join(name.upper().replace("-", " ").split())
    for pattern, short in _GPU_PATTERNS:
        match = re.search(pattern, upper)
        if match:
            return short.format(*match.groups())
    # Unknown card: keep its model token so `allowed_hardware` can still name it.
    words = [w for w in upper.split() if w not in {"NVIDIA", "GEFORCE", "TESLA", "QUADRO"}]
    return re.sub(r"[^A-Z0-9]", "", words[0]) if words else "GPU"


def parse_nvidia_smi(text: str) -> list[GpuInfo]:
    """Parse `--format=csv,noheader,nounits` rows of `index,uuid,name,memory.total` (or `name,memory.total`)."""
    gpus: list[GpuInfo] = []
    for position, line in enumerate(text.splitlines()):
        fields = [f.strip() for f in line.split(",")]
        if not line.strip():
            continue
        try:
            if len(fields) >= 4:
                index, uuid, name, memory = (
                    int(fields[0]),
                    fields[1],
                    ",".join(fields[2:-1]),
                    fields[-1],
                )
            elif len(fields) >= 2:
                index, uuid, name, memory = position, None, ",".join(fields[:-1]), fields[-1]
            else:
                raise ValueError("too few fields")
            memory_mib = float(memory)
        except ValueError:
            logger.warning("ignoring unparsable nvidia-smi line %r", line)
            continue
        gpus.append(GpuInfo(index=index, uuid=uuid, name=name.strip(), memory_mib=memory_mib))
    return gpus


def _visible(gpus: list[GpuInfo], cuda_visible_devices: str | None) -> list[GpuInfo]:
    """Keep the GPUs CUDA_VISIBLE_DEVICES exposes: a worker pinned to GPU 3 must not offer all eight."""
    if cuda_visible_devices is None:
        return gpus
    wanted = [v.strip() for v in cuda_visible_devices.split(",") if v.strip()]
    chosen: list[GpuInfo] = []
    for token in wanted:
        if token.lstrip("-").isdigit():
            if int(token) < 0:
                break  # CUDA stops at the first invalid index
            match = [g for g in gpus if g.index == int(token)]
        else:
            match = [g for g in gpus if g.uuid and (g.uuid == token or g.uuid.startswith(token))]
        if not match:
            break
        if match[0] not in chosen:
            chosen.append(match[0])
    return chosen


def _gb(mib: float) -> float:
    # Decimal GB: a card sold as "80GB" (81559 MiB) then satisfies requires_vram_gb=80.
    return round(mib * 1024 * 1024 / 1e9, 1)


def hardware_from_gpus(gpus: list[GpuInfo], *, cpu_count: int, memory_gb: float) -> Hardware:
    """Summarise GPUs as the wire `Hardware`; the first GPU names the type of a mixed machine."""
    if not gpus:
        return Hardware(hardware_type="cpu", cpu_count=cpu_count, memory_gb=memory_gb)
    gpu_type = gpu_short_name(gpus[0].name)
    if len({gpu_short_name(g.name) for g in gpus}) > 1:
        logger.warning("mixed GPU types %s; registering as %s", [g.name for g in gpus], gpu_type)
    return Hardware(
        gpu_type=gpu_type,
        gpu_count=len(gpus),
        vram_gb=round(sum(_gb(g.memory_mib) for g in gpus), 1),
        hardware_type=f"{len(gpus)}x {gpu_type}",
        cpu_count=cpu_count,
        memory_gb=memory_gb,
    )


def _run_nvidia_smi() -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, f"--query-gpu={NVIDIA_SMI_QUERY}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=_NVIDIA_SMI_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        logger.warning("nvidia-smi failed (%s); registering as a CPU worker", e)
        return None
    if out.returncode != 0:
        logger.warning(
            "nvidia-smi exited %d (%s); registering as a CPU worker",
            out.returncode,
            out.stderr.strip()[:200],
        )
        return None
    return out.stdout


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _memory_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) * 1024 / 1e9, 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
    except (AttributeError, ValueError, OSError):
        return 0.0


def probe_hardware(environ: Mapping[str, str] | None = None) -> Hardware:
    """Probe GPUs (nvidia-smi, honouring CUDA_VISIBLE_DEVICES), CPU count and memory."""
    env = os.environ if environ is None else environ
    text = _run_nvidia_smi()
    gpus = _visible(parse_nvidia_smi(text), env.get("CUDA_VISIBLE_DEVICES")) if text else []
    return hardware_from_gpus(gpus, cpu_count=_cpu_count(), memory_gb=_memory_gb())


#: Short alias (`openweights.service` sizes the local pool with it).
probe = probe_hardware


def probe_cached_models(environ: Mapping[str, str] | None = None, *, limit: int = 500) -> list[str]:
    """Models in the local Hugging Face cache ("org/name"), so the server can prefer warm workers."""
    env = os.environ if environ is None else environ
    if env.get("HF_HUB_CACHE"):
        hub = Path(env["HF_HUB_CACHE"])
    elif env.get("HF_HOME"):
        hub = Path(env["HF_HOME"]) / "hub"
    else:
        hub = Path("~/.cache/huggingface/hub").expanduser()
    try:
        names = sorted(p.name for p in hub.iterdir() if p.name.startswith("models--"))
    except OSError:
        names = []
    found = [n[len("models--") :].replace("--", "/") for n in names[:limit]]
    # models of the openweights registry that jobs on this machine already fetched
    for marker in sorted(model_cache_dir(env).glob("*/.complete"))[: max(0, limit - len(found))]:
        try:
            name = marker.read_text().strip()
        except OSError:
            continue
        if name and name not in found:
            found.append(name)
    return found


def model_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where jobs on this machine keep registry models (`openweights.jobs.model_source`)."""
    env = os.environ if environ is None else environ
    if env.get("OPENWEIGHTS_MODEL_CACHE"):
        return Path(env["OPENWEIGHTS_MODEL_CACHE"])
    home = env.get("OPENWEIGHTS_HOME") or "~/.openweights"
    return Path(home).expanduser() / "models"
