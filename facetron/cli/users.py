"""``facetron users list|show|delete``: the user registry (facetron.users)."""

from __future__ import annotations

import argparse
import json

from facetron.cli.options import add_users_dir
from facetron.errors import NotFoundError
from facetron.users import registry_at, validate_user_id


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("users", help="list, show or delete registered users")
    nested = p.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    ls = nested.add_parser("list", help="registered users, one per line (id, version, LoRA yes/no)")
    add_users_dir(ls)
    ls.set_defaults(func=run_list)
    show = nested.add_parser("show", help="one user's served version and files, as JSON")
    show.add_argument("user", help="user id")
    add_users_dir(show)
    show.set_defaults(func=run_show)
    rm = nested.add_parser("delete", help="remove a user and all its versions (served nowhere after this)")
    rm.add_argument("user", help="user id")
    add_users_dir(rm)
    rm.set_defaults(func=run_delete)


def run_list(args: argparse.Namespace) -> int:
    registry = registry_at(args.users_dir)
    for user in registry.users():
        info = registry.describe(user)
        print(f"{user}\t{info['version']}\tlora={'yes' if info['has_lora'] else 'no'}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    registry = registry_at(args.users_dir)
    print(json.dumps(registry.describe(validate_user_id(args.user, "user")), indent=2))
    return 0


def run_delete(args: argparse.Namespace) -> int:
    registry = registry_at(args.users_dir)
    user = validate_user_id(args.user, "user")
    if not registry.delete(user):
        raise NotFoundError(f"user: no user {user!r} in {registry.root}")
    print(f"deleted user {user!r} from {registry.root}")
    return 0
