"""`python -m openweights.worker`: run one worker against a server."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from openweights._settings import Settings
from openweights.worker._worker import run_worker

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m openweights.worker",
        description="Claim jobs from an openweights server and run them on this machine.",
    )
    parser.add_argument("--url", help="server URL (default: $OPENWEIGHTS_URL)")
    parser.add_argument("--token", help="worker or user token (default: $OPENWEIGHTS_API_KEY)")
    parser.add_argument("--name", help="worker name shown in `ow` and the dashboard")
    parser.add_argument(
        "--any-hardware",
        action="store_true",
        help="take every job of the org whatever hardware it asks for",
    )
    parser.add_argument("--docker-image", help="image this worker runs; it takes only its jobs")
    parser.add_argument("--max-jobs", type=int, help="exit after running this many jobs")
    parser.add_argument("--workdir", help="where run directories go (default: a temp dir)")
    parser.add_argument("--idle-exit-s", type=float, help="exit after this long without a job")
    parser.add_argument(
        "--cancel-grace-s", type=float, help="SIGTERM → SIGKILL grace when a job is stopped"
    )
    parser.add_argument(
        "--shutdown-grace-s",
        type=float,
        default=10.0,
        help="on SIGTERM, how long a running job may finish before it is requeued (default 10)",
    )
    parser.add_argument(
        "--provider", default="local", help="where this worker runs (local, runpod…)"
    )
    parser.add_argument("--echo", action="store_true", help="copy job output to this terminal")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # httpx logs every request at INFO: heartbeats and log batches would drown the worker's own.
        logging.getLogger("httpx").setLevel(logging.WARNING)
    settings = Settings()
    url = args.url or settings.url
    token = args.token or settings.api_key
    if not url or not token:
        print(
            "error: the worker needs a server: pass --url and --token "
            "(or set OPENWEIGHTS_URL and OPENWEIGHTS_API_KEY)",
            file=sys.stderr,
        )
        return 2
    return run_worker(
        url=url,
        token=token,
        name=args.name,
        any_hardware=args.any_hardware,
        docker_image=args.docker_image,
        max_jobs=args.max_jobs,
        workdir=args.workdir,
        idle_exit_s=args.idle_exit_s,
        cancel_grace_s=args.cancel_grace_s,
        shutdown_grace_s=args.shutdown_grace_s,
        echo_job_output=args.echo,
        provider=args.provider,
    )


if __name__ == "__main__":
    sys.exit(main())
