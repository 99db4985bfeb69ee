"""Start a job's script in its own session and stop the whole process group.

A job often forks (accelerate, vLLM engine cores, dataloader workers). Signalling only the shell
would leave those running and holding GPU memory, so every signal goes to the process group, and
SIGTERM is escalated to SIGKILL after a grace period (the original waited 60 s and never escalated).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from pathlib import Path

__all__ = [
    "describe_returncode",
    "group_alive",
    "normalize_exit_code",
    "spawn_job",
    "terminate_group",
]

logger = logging.getLogger(__name__)

_POLL_S = 0.05  # only while escalating a kill: group exit has no event to wait on


def spawn_job(script: str, *, cwd: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Run `script` with bash in `cwd`, stdout+stderr merged into one pipe, as a new session."""
    return subprocess.Popen(
        ["bash", "-c", script],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # own session + process group: we can signal all of it, Ctrl-C can't
        close_fds=True,
    )


def _signal_group(pgid: int, sig: signal.Signals) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        logger.warning("not permitted to send %s to process group %d", sig.name, pgid)
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped, e.g. under a PID 1 that never reaps) is dead for us.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is left in process group `pgid`."""
    proc = Path("/proc")
    if proc.is_dir():
        for entry in proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            # fields: state, ppid, pgrp, ...
            if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
                return True
        return False
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def terminate_group(
    proc: subprocess.Popen[bytes], *, grace_s: float, sig: signal.Signals = signal.SIGTERM
) -> bool:
    """Send `sig` to the job's process group, SIGKILL what is left after `grace_s`.

    Returns True when SIGKILL was needed. Waits until the leader is reaped.
    """
    pgid = proc.pid  # start_new_session: the leader's pid is the group id
    if sig != signal.SIGKILL and _signal_group(pgid, sig):
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if proc.poll() is not None and not group_alive(pgid):
                return False
            time.sleep(_POLL_S)
    forced = _signal_group(pgid, signal.SIGKILL)
    if proc.poll() is None and not forced:
        proc.kill()  # group vanished but leader not reaped yet; cannot happen in practice
        forced = True
    proc.wait()
    return forced


def normalize_exit_code(returncode: int) -> int:
    """Shell convention: a death by signal N is exit code 128+N (Popen says -N)."""
    return 128 - returncode if returncode < 0 else returncode


def describe_returncode(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"exit code {normalize_exit_code(returncode)} (killed by {name})"
    return f"exit code {returncode}"
