"""Progress bars and the `job.wait()` status line, on stderr and only on a terminal.

tqdm is imported only when a bar is really shown, so scripts and pipes pay nothing.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["PROGRESS_MIN_BYTES", "JobStatusLine", "byte_bar", "count_bar", "stderr_is_tty"]

#: Transfers smaller than this get no bar: it would only flash.
PROGRESS_MIN_BYTES = 8 << 20


def stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class _NoBar:
    """Stands in for a tqdm bar when none is shown."""

    n = 0
    total = None

    def update(self, n: int = 1) -> None:
        pass

    def reset(self, total: Any = None) -> None:
        pass

    def refresh(self) -> None:
        pass

    def set_description_str(self, s: str) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def byte_bar(total: int | None, desc: str, *, show: bool | None = None) -> Any:
    """A bytes progress bar for transfers larger than `PROGRESS_MIN_BYTES`, on a TTY."""
    if show is None:
        show = total is not None and total >= PROGRESS_MIN_BYTES and stderr_is_tty()
    if not show:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
    )


#: Fewer items than this get no count bar.
PROGRESS_MIN_ITEMS = 20


def count_bar(total: int, desc: str, *, show: bool | None = None) -> Any:
    """A count progress bar (files of a job's mounts) for `PROGRESS_MIN_ITEMS` or more, on a TTY.
    Its `update` may be called from several threads (tqdm locks)."""
    if show is None:
        show = total >= PROGRESS_MIN_ITEMS and stderr_is_tty()
    if not show:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(
        total=total, desc=desc, unit="file", file=sys.stderr, leave=False, dynamic_ncols=True
    )


_STEP_KEYS = ("step", "global_step", "current_step", "done", "completed")
_TOTAL_KEYS = ("total_steps", "max_steps", "total")


def describe_progress(data: dict[str, Any]) -> tuple[float | None, float | None, str]:
    """(done, total, short text) from one event's data, as far as it says anything about progress."""
    done = total = None
    for k in _STEP_KEYS:
        if isinstance(data.get(k), int | float) and not isinstance(data.get(k), bool):
            done = data[k]
            break
    for k in _TOTAL_KEYS:
        if isinstance(data.get(k), int | float) and not isinstance(data.get(k), bool):
            total = data[k]
            break
    frac = data.get("progress")
    if done is None and isinstance(frac, int | float) and 0 <= frac <= 1:
        done, total = frac * 100, 100
    parts = []
    for k, v in data.items():
        if isinstance(v, bool) or not isinstance(v, str | int | float):
            continue
        if isinstance(v, float):
            v = f"{v:.4g}"
        text = f"{k}={v}"
        parts.append(text if len(text) <= 40 else text[:37] + "...")
        if len(parts) == 4:
            break
    return done, total, " ".join(parts)


_PLAIN = "{desc} [{elapsed}]"
_WITH_BAR = "{desc} {percentage:3.0f}%|{bar:20}| [{elapsed}]"


class JobStatusLine:
    """One live line for `job.wait()`: id, status, why pending, latest progress event."""

    def __init__(self, job_id: str, *, enabled: bool | None = None) -> None:
        self.job_id = job_id
        self.enabled = stderr_is_tty() if enabled is None else enabled
        self._bar: Any = None

    def update(self, job: Any, latest_event: dict[str, Any] | None = None) -> None:
        if not self.enabled:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(
                total=None, file=sys.stderr, leave=False, dynamic_ncols=True, bar_format=_PLAIN
            )
        done = total = None
        text = ""
        if latest_event:
            done, total, text = describe_progress(latest_event)
        if job.status == "pending" and getattr(job, "pending_reason", None):
            text = f"({job.pending_reason}) {text}".strip()
        if done is not None and total:
            self._bar.bar_format = _WITH_BAR
            self._bar.total = total
            self._bar.n = done
        else:
            self._bar.bar_format = _PLAIN
        self._bar.set_description_str(f"{self.job_id}: {job.status} {text}".rstrip(), refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
