"""`ow ls`, `ow cancel`, `ow logs`, `ow fetch`: jobs, their logs, files."""

from __future__ import annotations

import argparse
import sys
import time
from typing import IO, Any

from openweights.cli import _common as c

STATUSES = ["pending", "in_progress", "completed", "failed", "canceled"]
#: Reconnects of `ow logs -f` after a dropped connection before giving up.
FOLLOW_RECONNECTS = 5


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ls",
        help="List jobs (ids only when piped).",
        description="List jobs, newest first. On a terminal: a table (id, type, status, "
        "created, model). Piped: job ids only, one per line, e.g. "
        "`ow ls --status pending | ow cancel`.",
    )
    p.add_argument("--status", choices=STATUSES, help="Only jobs in this status.")
    p.add_argument("--type", help="Only jobs of this type (e.g. custom, fine-tuning).")
    p.add_argument(
        "--limit", type=int, default=100, help="At most this many jobs (default: %(default)s)."
    )
    p.add_argument(
        "--cost",
        action="store_true",
        help="The table with each job's cost and the org's total, even when piped.",
    )
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser(
        "cancel",
        help="Cancel jobs by id (reads ids from stdin when none are given).",
        description="Cancel pending or running jobs. Without ids, reads them from stdin "
        "(`ow ls --status pending | ow cancel`). Jobs that already ended are skipped with a note.",
    )
    p.add_argument("ids", nargs="*", metavar="JOB_ID", help="Jobs to cancel.")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser(
        "logs",
        help="Print the log of a job's latest run (-f: follow it live).",
        description="Print the log of a job's latest run, or of --run-id. With -f, stream it "
        "live until the job ends (waiting for a pending job to start, and following retries).",
    )
    p.add_argument("job_id", metavar="JOB_ID")
    p.add_argument(
        "--run-id", type=int, metavar="RUN_ID", help="A specific run (default: the latest)."
    )
    p.add_argument(
        "-f", "--follow", action="store_true", help="Stream the log live until the job ends."
    )
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser(
        "fetch",
        help="Fetch a file's content by id.",
        description="Download a file by id: to --output, else to stdout.",
    )
    p.add_argument("file_id", metavar="FILE_ID")
    p.add_argument("--output", "-o", metavar="PATH", help="Write here instead of stdout.")
    p.set_defaults(func=cmd_fetch)


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- ls


def cmd_ls(args: argparse.Namespace) -> int:
    ow = c.make_client()
    jobs = ow.jobs.list(status=args.status, type=args.type, limit=args.limit)
    if not c.stdout_is_tty() and not getattr(args, "cost", False):
        for job in jobs:
            print(job.id)
        return 0
    from openweights.client._models import format_time

    rows = [(j.id, j.type, j.status, format_time(j.created_at), j.model) for j in jobs]
    headers = ["ID", "TYPE", "STATUS", "CREATED", "MODEL"]
    costs = _costs(ow, min((j.created_at for j in jobs), default=None))
    waits = _waits(ow) if any(j.status == "pending" for j in jobs) else {}
    if waits:  # the cluster manager's reason a pending job has no pod yet
        headers.append("WAITING FOR")
        rows = [(*r, _short(waits.get(j.id))) for r, j in zip(rows, jobs, strict=True)]
    if costs is not None:
        headers.append("COST USD")
        rows = [
            (*r, f"{costs['by_job'].get(j.id, 0.0):.4f}") for r, j in zip(rows, jobs, strict=True)
        ]
    print(c.format_table(headers, rows))
    if costs is not None:
        print(
            f"org since {format_time(costs['since'])}: {costs['total_usd']:.4f} USD of job runs, "
            f"{costs['billed_usd']:.4f} USD of pod time billed (boot and idle included)"
        )
    return 0


def _short(text: str | None, width: int = 60) -> str | None:
    return text if text is None or len(text) <= width else text[: width - 1] + "…"


def _waits(ow: Any) -> dict[str, str]:
    from openweights._exceptions import APIConnectionError, APIStatusError

    try:
        return ow._http.request("GET", "/v1/cluster/waits").json().get("reasons") or {}
    except (APIStatusError, APIConnectionError):
        return {}


def _costs(ow: Any, since: float | None) -> dict | None:
    """Cost per job and the org's totals since the oldest listed job (`/v1/cluster/costs`)."""
    from openweights._exceptions import APIConnectionError, APIStatusError

    if since is None:
        return None
    try:
        r = ow._http.request("GET", "/v1/cluster/costs", params={"since": since}).json()
    except (APIStatusError, APIConnectionError):
        return None  # an older server, or a token that may not read costs: no column
    return {**r, "since": since}


# ---------------------------------------------------------------- cancel


def _ids_from_stdin() -> list[str]:
    return [tok for line in sys.stdin for tok in line.split()]


def cmd_cancel(args: argparse.Namespace) -> int:
    from openweights._exceptions import ConflictError, NotFoundError

    ids = list(args.ids)
    if not ids:
        if c.stdin_is_tty():
            raise c.CLIError("Give job ids, or pipe them: ow ls --status pending | ow cancel")
        ids = _ids_from_stdin()
    ow = c.make_client()
    failed = 0
    for job_id in ids:
        try:
            ow.jobs.cancel(job_id)
        except ConflictError:
            status = ow.jobs.retrieve(job_id).status
            _note(f"skipped {job_id}: already {status}")
            continue
        except NotFoundError:
            _note(f"error: job {job_id} not found")
            failed += 1
            continue
        print(job_id, flush=True)
    return 1 if failed else 0


# ---------------------------------------------------------------- logs


def _write(out: IO[bytes], data: bytes) -> None:
    out.write(data)
    out.flush()


def _print_log(ow: Any, run: Any, out: IO[bytes]) -> None:
    from openweights._exceptions import NotFoundError

    try:
        data = ow.runs.log_content(run.id)
    except NotFoundError:
        if not run.log_file:
            raise
        data = ow.files.content(run.log_file)
    _write(out, data)


def _follow_run(ow: Any, run_id: int, out: IO[bytes]) -> Any:
    """Stream a run's log until the run ends (reconnecting at the byte offset); return the run."""
    from openweights._exceptions import APIConnectionError

    offset = 0
    drops = 0
    while True:
        got = 0
        try:
            for chunk in ow.runs.stream_log(run_id, offset=offset, follow=True):
                _write(out, chunk)
                offset += len(chunk)
                got += len(chunk)
        except APIConnectionError:
            drops += 1
            if drops > FOLLOW_RECONNECTS:
                raise
            time.sleep(min(2**drops, 10))  # back off before reconnecting
            continue
        run = ow.runs.retrieve(run_id)
        if run.status != "in_progress":
            return run
        if not got:
            time.sleep(1)  # the stream closed early with nothing new: don't spin


def _pending_note(job: Any) -> str:
    reason = f" ({job.pending_reason})" if job.pending_reason else ""
    return f"{job.id} is pending{reason}; waiting for it to start..."


def _await_change(ow: Any, job_id: str) -> None:
    """A new run is being set up: long-poll briefly instead of spinning."""
    from openweights.client import WaitTimeoutError

    try:
        ow.jobs.wait(job_id, timeout_s=5)
    except WaitTimeoutError:
        pass


def _show_progress(ow: Any, job_id: str) -> None:
    """On a terminal, the job's live status and progress (step/total, loss, ETA: its latest
    progress event) as a bar on stderr, beside the log on stdout; `job.wait()` draws it."""
    import threading

    from openweights.client._progress import stderr_is_tty

    if not stderr_is_tty():
        return

    def draw() -> None:
        try:
            ow.jobs.wait(job_id)
        except Exception:  # the bar is a courtesy: the log stream reports real errors
            pass

    threading.Thread(target=draw, name=f"ow-logs-progress-{job_id}", daemon=True).start()


def cmd_logs(args: argparse.Namespace) -> int:
    ow = c.make_client()
    out = sys.stdout.buffer
    if args.run_id is not None:
        run = ow.runs.retrieve(args.run_id)
        if run.job_id != args.job_id:
            raise c.CLIError(f"Run {run.id} belongs to job {run.job_id}, not {args.job_id}.")
        if args.follow:
            _follow_run(ow, run.id, out)
        else:
            _print_log(ow, run, out)
        return 0

    if not args.follow:
        runs = ow.runs.list(job_id=args.job_id)
        if not runs:
            job = ow.jobs.retrieve(args.job_id)
            reason = f" ({job.pending_reason})" if job.pending_reason else ""
            raise c.CLIError(
                f"Job {job.id} has no runs yet: it is {job.status}{reason}. "
                "Use `ow logs -f` to wait for it and follow its log."
            )
        _print_log(ow, runs[-1], out)
        return 0

    _show_progress(ow, args.job_id)
    followed: set[int] = set()
    while True:
        job = ow.jobs.retrieve(args.job_id)
        if job.status == "pending":
            _note(_pending_note(job))
            job = ow.jobs.wait(job.id, until="started")
        runs = ow.runs.list(job_id=job.id)
        fresh = [r for r in runs if r.id not in followed]
        if not fresh:
            if job.done:
                if not runs:
                    _note(f"{job.id} is {job.status} and never ran.")
                return 0
            _await_change(ow, job.id)
            continue
        run = fresh[-1]
        if followed:
            _note(f"--- {job.id}: attempt {run.attempt} (run {run.id}) ---")
        followed.add(run.id)
        _follow_run(ow, run.id, out)


# ---------------------------------------------------------------- fetch


def cmd_fetch(args: argparse.Namespace) -> int:
    ow = c.make_client()
    if args.output:
        path = ow.files.download(args.file_id, args.output)
        _note(f"Saved {args.file_id} to {path}")
        return 0
    out = sys.stdout.buffer
    for chunk in ow.files.iter_content(args.file_id):
        out.write(chunk)
    out.flush()
    return 0
