"""`ow serve`, `ow worker`, `ow service …`: run the server, a worker, the embedded service."""

from __future__ import annotations

import argparse
from typing import Any

from openweights.cli import _common as c


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="Run the openweights server (API and dashboard).",
        description="Run the openweights HTTP server in the foreground. It uses "
        "OPENWEIGHTS_DATABASE_URL and OPENWEIGHTS_STORAGE_URL (default: SQLite and a blob "
        "directory in OPENWEIGHTS_HOME).",
    )
    p.add_argument(
        "--host", default="0.0.0.0", help="Interface to listen on (default: %(default)s)."
    )
    p.add_argument(
        "--port", type=int, default=8124, help="Port to listen on (default: %(default)s)."
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "worker",
        help="Run a worker that executes jobs from the queue.",
        description="Run a worker in the foreground: it registers with the server, claims jobs "
        "that fit this machine's hardware and runs them. URL and token default to "
        "OPENWEIGHTS_URL and OPENWEIGHTS_API_KEY (a worker token: `ow token create --kind worker`).",
    )
    p.add_argument("--url", help="Server URL (default: $OPENWEIGHTS_URL).")
    p.add_argument("--token", help="API token (default: $OPENWEIGHTS_API_KEY).")
    p.add_argument(
        "--env-file", metavar="FILE", help="Load KEY=VALUE lines into the environment first."
    )
    p.add_argument(
        "--name", help="Worker name shown in `ow.workers.list()` (default: the hostname)."
    )
    p.add_argument(
        "--any-hardware", action="store_true", help="Take every job, whatever it requires."
    )
    p.add_argument(
        "--docker-image", metavar="IMAGE", help="Only take jobs for this image (or none)."
    )
    p.add_argument("--max-jobs", type=int, metavar="N", help="Exit after running N jobs.")
    p.add_argument("--workdir", metavar="DIR", help="Where job working directories are created.")
    p.set_defaults(func=cmd_worker)

    svc = sub.add_parser(
        "service",
        help="Control the embedded local service (server + local workers).",
        description="The embedded service is what `OpenWeights()` uses when no OPENWEIGHTS_URL "
        "is set: a local server and worker pool in the background, data in OPENWEIGHTS_HOME.",
    )
    ssub = svc.add_subparsers(dest="service_cmd", metavar="{status,start,stop,restart}")
    ssub.required = True
    for name, func, help_, description in [
        (
            "status",
            cmd_service_status,
            "Show whether it runs, where, and its workers.",
            "Show the embedded service: whether it runs, its URL and process id, its home "
            "directory and its local workers.",
        ),
        (
            "start",
            cmd_service_start,
            "Start it (or attach to the running one).",
            "Start the embedded service in the background, or find the one already running, "
            "and print its URL.",
        ),
        (
            "stop",
            cmd_service_stop,
            "Stop it (running jobs are requeued).",
            "Stop the embedded service and its local workers; jobs they were running go back "
            "to the queue.",
        ),
        (
            "restart",
            cmd_service_restart,
            "Stop it, then start it again.",
            "Stop the embedded service, then start it again (e.g. after upgrading openweights).",
        ),
    ]:
        ssub.add_parser(name, help=help_, description=description).set_defaults(func=func)


def _import(module: str, name: str) -> Any:
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise c.CLIError(f"{module}.{name} is not available in this install ({e}).") from None


# ---------------------------------------------------------------- serve / worker


def cmd_serve(args: argparse.Namespace) -> int:
    serve = _import("openweights.server", "serve")
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    print(f"openweights dashboard: http://{shown}:{args.port}/dashboard/", flush=True)
    serve(host=args.host, port=args.port)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    if args.env_file:
        c.load_env_file(args.env_file)
    from openweights._settings import Settings

    settings = Settings()  # read after --env-file filled the environment
    url = args.url or settings.url
    token = args.token or settings.api_key
    if not url or not token:
        raise c.CLIError(
            "ow worker needs a server URL and a token: --url/--token, or OPENWEIGHTS_URL and "
            "OPENWEIGHTS_API_KEY (in the environment or --env-file). Create a worker token with "
            "`ow token create --kind worker`. (The embedded service runs its own local workers.)"
        )
    run_worker = _import("openweights.worker", "run_worker")
    code = run_worker(
        url=url,
        token=token,
        name=args.name,
        any_hardware=args.any_hardware,
        docker_image=args.docker_image,
        max_jobs=args.max_jobs,
        workdir=args.workdir,
    )
    return code if isinstance(code, int) else 0


# ---------------------------------------------------------------- service


def _as_dict(obj: Any) -> dict[str, Any]:
    import dataclasses

    if isinstance(obj, dict):
        return obj
    if hasattr(obj, "model_dump"):
        return obj.model_dump()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if hasattr(obj, "_asdict"):
        return obj._asdict()
    return {k: v for k, v in vars(obj).items() if not k.startswith("_")}


def format_status(status: Any) -> str:
    """The embedded service's status as `key: value` lines (workers one per line)."""
    data = _as_dict(status)
    lines = []
    for key, value in data.items():
        if isinstance(value, list | tuple):
            lines.append(f"{key}: {len(value)}")
            for item in value:
                if isinstance(item, dict) or hasattr(item, "__dict__"):
                    d = _as_dict(item)
                    item = "  ".join(
                        f"{k}={v}" for k, v in d.items() if not isinstance(v, dict | list)
                    )
                lines.append(f"  - {item}")
        else:
            lines.append(f"{key}: {'-' if value is None else value}")
    return "\n".join(lines)


def cmd_service_status(args: argparse.Namespace) -> int:
    from openweights._settings import Settings

    status = _import("openweights.service", "status")(Settings())
    print(format_status(status))
    return 0


def cmd_service_start(args: argparse.Namespace) -> int:
    from openweights._settings import Settings

    creds = _import("openweights.service", "ensure_running")(Settings())
    print(f"openweights service running at {creds.url}")
    return 0


def cmd_service_stop(args: argparse.Namespace) -> int:
    from openweights._settings import Settings

    _import("openweights.service", "stop")(Settings())
    print("openweights service stopped")
    return 0


def cmd_service_restart(args: argparse.Namespace) -> int:
    cmd_service_stop(args)
    return cmd_service_start(args)
