"""Pure helpers for the pages: formatting, status history, the "copy as Python" snippet, params
diffs, and how a jsonl row is shown (chat, preference pair, completion table)."""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime
from typing import Any

TERMINAL = ("completed", "failed", "canceled")


def ts(value: float | None) -> str:
    if value is None:
        return "–"
    return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def ago(value: float | None, now: float | None = None) -> str:
    if value is None:
        return "never"
    d = (now or time.time()) - value
    if d < 0:
        d = 0
    if d < 60:
        return f"{d:.0f}s ago"
    if d < 3600:
        return f"{d / 60:.0f}m ago"
    if d < 86400:
        return f"{d / 3600:.1f}h ago"
    return f"{d / 86400:.1f}d ago"


def duration(start: float | None, end: float | None = None) -> str:
    if start is None:
        return "–"
    d = max((end or time.time()) - start, 0)
    if d < 60:
        return f"{d:.1f}s"
    if d < 3600:
        return f"{int(d // 60)}m {int(d % 60)}s"
    return f"{int(d // 3600)}h {int(d % 3600 // 60)}m"


def size(n: int | None) -> str:
    if n is None:
        return "–"
    f = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if f < 1024 or unit == "GB":
            return f"{f:.0f} {unit}" if unit == "B" else f"{f:.1f} {unit}"
        f /= 1024
    return f"{f:.1f} TB"


def pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str, sort_keys=True)


def compact(value: Any, n: int = 120) -> str:
    s = json.dumps(value, ensure_ascii=False, default=str)
    return s if len(s) <= n else s[: n - 1] + "…"


def content_text(content: Any) -> str:
    """A message's content as text (strings, or OpenAI-style lists of parts / tagged blocks)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if isinstance(p, dict):
                parts.append(str(p.get("text", p.get("content", ""))))
            else:
                parts.append(str(p))
        return "".join(parts)
    return "" if content is None else json.dumps(content, ensure_ascii=False)


def short(value: Any) -> str:
    """An output value for a glance: floats to 6 significant digits, other JSON compact."""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, str):
        return value if len(value) <= 200 else value[:199] + "…"
    return compact(value, 200)


def heat(logp: float, lo: float, hi: float) -> str:
    """Background colour of a token: red (lo) → yellow → green (hi)."""
    t = 1.0 if hi <= lo else min(max((logp - lo) / (hi - lo), 0.0), 1.0)
    return f"hsl({t * 120:.0f},70%,80%)"


def hardware(worker: dict) -> str:
    """A worker's hardware in one line; fields a provider did not report are left out."""
    hw = worker.get("hardware") if isinstance(worker.get("hardware"), dict) else {}
    parts = [str(worker.get("hardware_type") or "?")]
    if hw.get("gpu_type"):
        parts.append(f"{hw.get('gpu_count') or 1}× {hw['gpu_type']}")
    if isinstance(worker.get("vram_gb"), int | float):
        parts.append(f"{worker['vram_gb']:g} GB VRAM")
    if isinstance(hw.get("cpu_count"), int | float):
        parts.append(f"{hw['cpu_count']:g} CPU")
    if isinstance(hw.get("memory_gb"), int | float):
        parts.append(f"{hw['memory_gb']:.1f} GB RAM")
    if worker.get("any_hardware"):
        parts.append("takes any job")
    return " · ".join(parts)


FILTERS = {
    "ts": ts,
    "ago": ago,
    "duration": duration,
    "size": size,
    "pretty": pretty,
    "compact": compact,
    "content_text": content_text,
    "short": short,
    "hardware": hardware,
}


def status_history(job: dict, runs: list[dict]) -> list[dict]:
    """What happened to a job, oldest first, from its timestamps and its runs."""
    out = [{"at": job["created_at"], "what": "created", "detail": ""}]
    if job["queued_at"] and job["queued_at"] > job["created_at"] + 0.001:
        out.append(
            {"at": job["queued_at"], "what": "queued again", "detail": "resubmitted or restarted"}
        )
    for r in runs:
        out.append(
            {
                "at": r["started_at"],
                "what": f"run {r['id']} started",
                "detail": f"attempt {r['attempt']} on {r['worker_id'] or '?'} ({r['hardware'] or '?'})",
            }
        )
        if r["finished_at"]:
            detail = r["error"] or (
                f"exit code {r['exit_code']}" if r["exit_code"] is not None else ""
            )
            out.append(
                {"at": r["finished_at"], "what": f"run {r['id']} {r['status']}", "detail": detail}
            )
    if job["status"] in TERMINAL and job["finished_at"]:
        out.append(
            {"at": job["finished_at"], "what": f"job {job['status']}", "detail": job["error"] or ""}
        )
    out.sort(key=lambda e: e["at"] or 0)
    return out


def _py(value: Any) -> str:
    return repr(value)


def python_snippet(job: dict) -> str:
    """Python that submits this job again (same type, params and requirements)."""
    params = job["params"] or {}
    vp = params.get("validated_params")
    lines = ["from openweights import OpenWeights", "", "ow = OpenWeights()"]
    if job["type"] in ("fine-tuning", "weighted_sft") and isinstance(vp, dict):
        attr = "fine_tuning" if job["type"] == "fine-tuning" else "weighted_sft"
        args = dict(vp)
        fid = args.get("finetuned_model_id")
        if isinstance(fid, str) and job["id"] in fid:  # filled in from the default template
            args.pop("finetuned_model_id")
        defaults = _defaults(job["type"])
        args = {k: v for k, v in args.items() if k not in defaults or defaults[k] != v}
        for k in ("requires_vram_gb", "allowed_hardware"):
            if k == "requires_vram_gb" and job[k]:
                args.setdefault(k, job[k])
            if k == "allowed_hardware" and job[k]:
                args.setdefault(k, job[k])
        body = "".join(f"    {k}={_py(v)},\n" for k, v in args.items())
        lines.append(f"job = ow.{attr}.create(\n{body})")
    else:
        kw = {"type": job["type"], "script": job["script"], "params": params}
        m = re.match(r"^(.+)-[0-9a-f]{12}(?:-(.+))?$", job["id"])
        if m and m.group(1) != "job":
            kw["id_prefix"] = m.group(1)
        if m and m.group(2) and not (isinstance(vp, dict) and vp.get("job_id_suffix")):
            kw["job_id_suffix"] = m.group(2)
        for k in ("model", "allowed_hardware", "docker_image", "timeout_s"):
            if job.get(k):
                kw[k] = job[k]
        if job.get("requires_vram_gb"):
            kw["requires_vram_gb"] = job["requires_vram_gb"]
        body = "".join(f"    {k}={_py(v)},\n" for k, v in kw.items())
        lines.append(f"job = ow.jobs.create(\n{body})")
    lines.append("print(job.id, job.status)")
    return "\n".join(lines) + "\n"


def _defaults(job_type: str) -> dict:
    try:
        from openweights.jobs.fine_tuning.params import TrainingConfig
    except Exception:  # the kind's params are optional here: show every value instead
        return {}
    out = {}
    for name, field in TrainingConfig.model_fields.items():
        if field.is_required():
            continue
        out[name] = field.get_default(call_default_factory=True)
    return out


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def params_diff(jobs: list[dict]) -> list[dict]:
    """One row per parameter: its value in each job and whether they differ."""
    flat = []
    for j in jobs:
        p = j["params"] or {}
        vp = p.get("validated_params", p)
        f = flatten(vp)
        f.update({"(type)": j["type"], "(model)": j["model"]})
        flat.append(f)
    keys = sorted(set().union(*flat))
    missing = object()
    rows = []
    for k in keys:
        vals = [f.get(k, missing) for f in flat]
        shown = ["–" if v is missing else compact(v, 80) for v in vals]
        rows.append({"key": k, "values": shown, "differs": len(set(shown)) > 1})
    rows.sort(key=lambda r: (not r["differs"], r["key"]))
    return rows


def row_kind(rows: list[Any]) -> str:
    """How a page of jsonl rows is shown: chat, preference, completion or json."""
    if not rows or not all(isinstance(r, dict) for r in rows):
        return "json"
    first = rows[0]
    if "chosen" in first and "rejected" in first:
        return "preference"
    if "completion" in first:
        return "completion"
    if isinstance(first.get("messages"), list):
        return "chat"
    return "json"


def prompt_of(row: dict) -> list[dict]:
    msgs = row.get("messages") or row.get("prompt") or []
    if isinstance(msgs, str):
        return [{"role": "user", "content": msgs}]
    return [m for m in msgs if isinstance(m, dict)]


def completion_of(row: dict) -> str:
    c = row.get("completion")
    if isinstance(c, list):
        return "\n---\n".join(content_text(x) for x in c)
    if c is None and isinstance(row.get("messages"), list) and row["messages"]:
        last = row["messages"][-1]
        if isinstance(last, dict) and last.get("role") == "assistant":
            return content_text(last.get("content"))
    return content_text(c)


def sample_table(columns: list[dict]) -> list[dict]:
    """Rows of prompt | completion at each chosen step (matched by position)."""
    if not columns:
        return []
    n = max(len(c["rows"]) for c in columns)
    out = []
    for i in range(n):
        base = next((c["rows"][i] for c in columns if i < len(c["rows"])), {})
        base = base if isinstance(base, dict) else {"completion": base}
        out.append(
            {
                "prompt": prompt_of(base),
                "completions": [
                    completion_of(c["rows"][i])
                    if i < len(c["rows"]) and isinstance(c["rows"][i], dict)
                    else "–"
                    for c in columns
                ],
            }
        )
    return out
