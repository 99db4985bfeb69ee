"""`ow`: the openweights command line.

Only argparse is imported up front; each command imports what it needs when it runs, so
`ow --help` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys

from openweights.cli import _common, account, jobs, local, models

DESCRIPTION = """\
OpenWeights CLI: submit and manage jobs (fine-tuning, inference, custom) on an openweights
server. Without OPENWEIGHTS_URL, commands use the embedded local service (started on demand);
with OPENWEIGHTS_URL and OPENWEIGHTS_API_KEY, they use that server."""

EPILOG = "Use `ow COMMAND --help` for the options of a command."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ow",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="Print the version and exit.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    account.add_parsers(sub)
    jobs.add_parsers(sub)
    local.add_parsers(sub)
    models.add_parsers(sub)
    from openweights.cli import cluster as cluster_cli  # cluster, deploy, manage, exec, ssh

    cluster_cli.add_parsers(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from openweights import __version__

        print(f"openweights {__version__}")
        return 0
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `ow ls | head`: the reader left; stay quiet (and keep Python from complaining at exit)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception as e:
        if not _common.is_user_error(e):
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
