"""`ow signup`, `ow token …`, `ow env …`: organizations, API tokens and secrets."""

from __future__ import annotations

import argparse
import sys

from openweights.cli import _common as c


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "signup",
        help="Create a new organization and its first API key.",
        description="Create an organization on a server and print its first API key (shown "
        "only once). Without --url or OPENWEIGHTS_URL it signs up on the embedded local service.",
    )
    p.add_argument("org_name", metavar="ORG_NAME", help="Name of the new organization.")
    p.add_argument("--email", help="Contact email stored with the organization.")
    p.add_argument(
        "--url", help="Server URL (default: $OPENWEIGHTS_URL, else the embedded service)."
    )
    p.set_defaults(func=cmd_signup)

    # ---- token
    tok = sub.add_parser(
        "token",
        help="Manage API tokens for your organization.",
        description="Create, list and revoke the API tokens of your organization.",
    )
    tsub = tok.add_subparsers(dest="token_cmd", metavar="{create,ls,revoke}")
    tsub.required = True
    p = tsub.add_parser(
        "create",
        help="Create a token and print its secret (shown only once).",
        description="Create an API token. On a terminal the secret is printed with a hint; "
        "piped, only the secret is printed (KEY=$(ow token create)).",
    )
    p.add_argument(
        "--name", default="api key", help="Label to recognise the token (default: %(default)s)."
    )
    p.add_argument(
        "--kind",
        choices=["user", "worker"],
        default="user",
        help="user: everything of the org; worker: only what `ow worker` needs (default: %(default)s).",
    )
    p.add_argument(
        "--expires-in-days", type=float, metavar="D", help="Expire after D days (default: never)."
    )
    p.set_defaults(func=cmd_token_create)
    p = tsub.add_parser(
        "ls",
        help="List the organization's tokens (never their secrets).",
        description="List the organization's tokens: id, name, kind, the first characters "
        "of the secret, creation and expiry, and whether it was revoked.",
    )
    p.set_defaults(func=cmd_token_ls)
    p = tsub.add_parser(
        "revoke",
        help="Revoke a token: it stops working at once.",
        description="Revoke a token by id (see `ow token ls`): every request with it is "
        "refused from now on.",
    )
    p.add_argument(
        "token_id", nargs="?", metavar="TOKEN_ID", help="Id of the token (see `ow token ls`)."
    )
    p.add_argument("--token-id", dest="token_id_opt", metavar="TOKEN_ID", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_token_revoke)

    # ---- env
    env = sub.add_parser(
        "env",
        help="Manage organization secrets (environment variables of your jobs).",
        description="Organization secrets are encrypted on the server and given to your "
        "organization's jobs as environment variables (HF_TOKEN, WANDB_API_KEY, …). Values "
        "are never shown again.",
    )
    esub = env.add_subparsers(dest="env_cmd", metavar="{import,set,ls,unset}")
    esub.required = True
    p = esub.add_parser(
        "import",
        help="Import the KEY=VALUE lines of a .env file as secrets.",
        description="Import a dotenv file (KEY=VALUE lines, # comments, quotes, `export`) as "
        "organization secrets; existing secrets of the same names are replaced.",
    )
    p.add_argument("file", metavar="FILE", help="Path to the .env file.")
    p.add_argument("-y", "--yes", action="store_true", help="Do not ask for confirmation.")
    p.set_defaults(func=cmd_env_import)
    p = esub.add_parser(
        "set",
        help="Set secrets: ow env set KEY=VALUE [KEY=VALUE ...].",
        description="Set one or more organization secrets, replacing those of the same name.",
    )
    p.add_argument("pairs", nargs="+", metavar="KEY=VALUE")
    p.set_defaults(func=cmd_env_set)
    p = esub.add_parser(
        "ls",
        aliases=["show"],
        help="List secret names (never values).",
        description="Print the names of the organization's secrets, one per line. Values are "
        "never shown: the server only gives them to jobs.",
    )
    p.set_defaults(func=cmd_env_ls)
    p = esub.add_parser(
        "unset",
        help="Delete secrets: ow env unset KEY [KEY ...].",
        description="Delete organization secrets by name; jobs started later no longer get them.",
    )
    p.add_argument("names", nargs="+", metavar="KEY")
    p.set_defaults(func=cmd_env_unset)


# ---------------------------------------------------------------- signup


def cmd_signup(args: argparse.Namespace) -> int:
    from openweights._settings import Settings
    from openweights.client import signup
    from openweights.client._client import resolve_url

    settings = Settings()
    explicit = args.url or settings.url
    url = resolve_url(base_url=args.url, settings=settings)
    resp = signup(args.org_name, email=args.email, base_url=url, settings=settings)
    key = resp.token.token
    where = url if explicit else f"the embedded service ({url})"
    print(f"Created organization {resp.org.name!r} ({resp.org.id}) on {where}.")
    print("Your API key (shown only once, store it now):")
    print(f"  {key}")
    print("\nUse it with:")
    if explicit:
        print(f"  export OPENWEIGHTS_URL={url}")
    print(f"  export OPENWEIGHTS_API_KEY={key}")
    return 0


# ---------------------------------------------------------------- tokens


def cmd_token_create(args: argparse.Namespace) -> int:
    ow = c.make_client()
    token = ow.tokens.create(name=args.name, kind=args.kind, expires_in_days=args.expires_in_days)
    if not c.stdout_is_tty():
        print(token.token)
        return 0
    print(f"Created {token.kind} token {token.id} ({token.name!r}); its secret, shown only once:")
    print(f"  {token.token}")
    if token.kind == "user":
        print(f"\n  export OPENWEIGHTS_API_KEY={token.token}")
    else:
        print(f"\n  ow worker --url {ow.base_url} --token {token.token}")
    return 0


def cmd_token_ls(args: argparse.Namespace) -> int:
    from openweights.client._models import format_time

    tokens = c.make_client().tokens.list()
    rows = [
        (
            t.id,
            t.name,
            t.kind,
            t.prefix + "…",
            format_time(t.created_at),
            format_time(t.expires_at) if t.expires_at else "never",
            "revoked" if t.revoked_at else "active",
        )
        for t in tokens
    ]
    print(c.format_table(["ID", "NAME", "KIND", "PREFIX", "CREATED", "EXPIRES", "STATE"], rows))
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    token_id = args.token_id or args.token_id_opt
    if not token_id:
        raise c.CLIError("Give the token id: ow token revoke TOKEN_ID (see `ow token ls`).")
    token = c.make_client().tokens.revoke(token_id)
    print(f"Revoked token {token.id} ({token.name!r}).")
    return 0


# ---------------------------------------------------------------- env


def cmd_env_import(args: argparse.Namespace) -> int:
    values = c.read_env_file(args.file)
    if not values:
        print(f"No variables in {args.file}; nothing imported.", file=sys.stderr)
        return 0
    ow = c.make_client()
    if not args.yes:
        if not c.stdin_is_tty():
            raise c.CLIError("Not a terminal: add -y to import without confirmation.")
        print(
            f"These {len(values)} secrets will be stored (encrypted) on {ow.base_url} and "
            "given to every job of your organization:",
            file=sys.stderr,
        )
        for name in values:
            print(f"  {name}", file=sys.stderr)
        answer = input("Import them? [y/N] ").strip().lower()
        if answer not in ("y", "yes"):
            print("Nothing imported.", file=sys.stderr)
            return 1
    ow.secrets.import_env(values)
    print(f"Imported {len(values)} secrets: {', '.join(values)}")
    return 0


def cmd_env_set(args: argparse.Namespace) -> int:
    values: dict[str, str] = {}
    for pair in args.pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise c.CLIError(f"Expected KEY=VALUE, got {pair!r}.")
        values[name] = value
    c.make_client().secrets.import_env(values)
    print(f"Set {', '.join(values)}.")
    return 0


def cmd_env_ls(args: argparse.Namespace) -> int:
    for secret in c.make_client().secrets.list():
        print(secret.name)
    return 0


def cmd_env_unset(args: argparse.Namespace) -> int:
    ow = c.make_client()
    for name in args.names:
        ow.secrets.unset(name)
        print(f"Unset {name}.")
    return 0
