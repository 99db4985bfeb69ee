"""`ow models ls|show|download|rm`: the model registry."""

from __future__ import annotations

import argparse
import json

from openweights.cli import _common as c


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models",
        help="List, show, download or forget the models your jobs produced.",
        description="The model registry: every fine-tune registers its result under its "
        "`finetuned_model_id`; any job's `model=` takes that name, or `NAME/checkpoint-N`.",
    )
    msub = p.add_subparsers(dest="models_command", metavar="SUBCOMMAND", required=True)

    q = msub.add_parser("ls", help="List models (names only when piped).")
    q.add_argument("--base-model", help="Only models trained from this base.")
    q.add_argument(
        "--limit", type=int, default=100, help="At most this many (default: %(default)s)."
    )
    q.set_defaults(func=cmd_ls)

    q = msub.add_parser(
        "show", help="Print one model as JSON (kind, base, job, files, checkpoints)."
    )
    q.add_argument("name", metavar="NAME")
    q.set_defaults(func=cmd_show)

    q = msub.add_parser(
        "download",
        help="Download a model (or one checkpoint) into a directory for from_pretrained.",
    )
    q.add_argument("name", metavar="NAME")
    q.add_argument("dir", metavar="DIR")
    q.add_argument("--checkpoint", metavar="SUBFOLDER", help="e.g. checkpoint-10")
    q.set_defaults(func=cmd_download)

    q = msub.add_parser("rm", help="Forget a model name (its files stay with the job).")
    q.add_argument("name", metavar="NAME")
    q.set_defaults(func=cmd_rm)


def cmd_ls(args: argparse.Namespace) -> int:
    models = c.make_client().models.list(base_model=args.base_model, limit=args.limit)
    if not c.stdout_is_tty():
        for m in models:
            print(m.id)
        return 0
    from openweights.client._models import format_time

    rows = [
        (
            m.id,
            m.kind,
            m.base_model or "-",
            m.job_id or "-",
            len(m.checkpoints),
            format_time(m.updated_at),
        )
        for m in models
    ]
    print(c.format_table(["NAME", "KIND", "BASE", "JOB", "CHECKPOINTS", "UPDATED"], rows))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    print(json.dumps(c.make_client().models.retrieve(args.name).to_dict(), indent=2))
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    out = c.make_client().models.download(args.name, args.dir, subfolder=args.checkpoint)
    print(out)
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    print(c.make_client().models.delete(args.name).id)
    return 0
