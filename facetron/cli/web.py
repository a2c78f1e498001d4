"""``facetron web``: the web app (Gradio) for people, over a Triton server's gRPC API.

The page talks to Triton only through :mod:`facetron.client`; preparing and
training run as subprocesses of ``facetron train`` (no model code in the web
process). It binds 127.0.0.1 unless FACETRON_ALLOW_PUBLIC_BIND=1 and --host.

Every session logs in (``--credentials FILE`` or $FACETRON_WEB_CREDENTIALS:
lines ``user_id:scrypt$...``, added with ``--add-login USER``) and acts only
as that user; without logins it refuses to start unless ``--no-login``
(single-user local use, loopback only, said in the log).
"""

from __future__ import annotations

import argparse
import getpass
import os
import signal
import sys
import time
from pathlib import Path

from facetron.cli.options import add_users_dir, under_data_root

DEFAULT_PORT = 7860
LOOPBACK = "127.0.0.1"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "web",
        help="web app: upload photos, train, pick a style, generate (over a Triton server's gRPC API)",
        description="A Gradio page on 127.0.0.1: photos -> prepare report + contact sheet -> training with "
                    "progress -> style and options -> generation with per-step progress -> gallery and download. "
                    "Portraits come from --server over gRPC; prepare/train run `facetron train` subprocesses "
                    "that write the user registry the server reads (--users-dir).",
    )
    p.add_argument("--server", default="127.0.0.1:8001", help="Triton gRPC endpoint host:port (default: %(default)s)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="web port (default: %(default)s)")
    p.add_argument("--host", default=LOOPBACK, help="bind address (loopback unless FACETRON_ALLOW_PUBLIC_BIND=1)")
    add_users_dir(p, "the user registry the server reads (default: $FACETRON_USERS_DIR, else $FACETRON_HOME/users)")
    p.add_argument("--work", type=Path, default=under_data_root("web"),
                   help="uploads, prepared data, LoRAs and generated portraits (default: %(default)s)")
    p.add_argument("--base-model", type=Path, default=None,
                   help="base model for training: the one the server was exported from (default: the tiny model)")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps the page starts with (default: the page's own default)")
    p.add_argument("--train-steps", type=int, default=None,
                   help="training steps the page starts with (default: the page's own default)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per portrait call")
    p.add_argument("--credentials", type=Path, default=None,
                   help="logins file, lines 'user_id:scrypt$...' (salted hashes; add with --add-login); "
                        "default: $FACETRON_WEB_CREDENTIALS")
    p.add_argument("--no-login", action="store_true",
                   help="no login, the user id is typed: single-user local use only (binds 127.0.0.1)")
    p.add_argument("--add-login", metavar="USER", default=None,
                   help="add or replace USER's login in --credentials (password from stdin, or asked twice "
                        "on a terminal), then exit")
    p.set_defaults(func=run)


def _credentials_path(args: argparse.Namespace):
    from facetron.web.auth import CREDENTIALS_ENV

    if args.credentials is not None:
        return args.credentials
    env = os.environ.get(CREDENTIALS_ENV, "").strip()
    return Path(env) if env else None


def _read_password() -> str:
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        from facetron.errors import InvalidInputError
        raise InvalidInputError("password", "the two entries differ")
    return first


def authenticator(args: argparse.Namespace):
    """Gradio's auth callable from the credentials file, or None with --no-login (refused otherwise)."""
    from facetron.errors import InvalidInputError
    from facetron.web.auth import CREDENTIALS_ENV, Authenticator, load_credentials

    path = _credentials_path(args)
    if args.no_login:
        if path is not None:
            raise InvalidInputError("--no-login", "is given together with credentials: choose one")
        return None
    if path is None:
        raise InvalidInputError("--credentials", f"no logins configured (neither --credentials nor "
                                                  f"${CREDENTIALS_ENV}): add one with `facetron web --add-login USER "
                                                  "--credentials FILE`, or run --no-login for single-user local use")
    return Authenticator(load_credentials(path))


def web_config(args: argparse.Namespace):
    from facetron.client.connection import check_url
    from facetron.diffusion.styles import DEFAULT_STYLE, STYLES
    from facetron.errors import InvalidInputError
    from facetron.web.app import DEFAULT_TRAIN_STEPS, DEFAULT_WEB_STEPS, WebConfig

    if args.host != LOOPBACK and not os.environ.get("FACETRON_ALLOW_PUBLIC_BIND"):
        raise InvalidInputError("--host", f"{args.host} is not loopback: set FACETRON_ALLOW_PUBLIC_BIND=1 to bind it")
    if not 0 < args.port < 65536:
        raise InvalidInputError("--port", f"must be in 1..65535, got {args.port}")
    return WebConfig(
        server=check_url(args.server, "--server"),
        work_dir=args.work.resolve(),
        users_dir=args.users_dir.resolve() if args.users_dir else None,
        base_model=args.base_model.resolve() if args.base_model else None,
        styles=tuple(STYLES),
        default_style=DEFAULT_STYLE,
        default_steps=args.steps or DEFAULT_WEB_STEPS,
        default_train_steps=args.train_steps or DEFAULT_TRAIN_STEPS,
        timeout_s=args.timeout,
    )


def add_login(args: argparse.Namespace) -> int:
    from facetron.errors import InvalidInputError
    from facetron.web.auth import set_login

    path = _credentials_path(args)
    if path is None:
        raise InvalidInputError("--add-login", "needs --credentials FILE (or $FACETRON_WEB_CREDENTIALS)")
    set_login(path, args.add_login, _read_password())
    print(f"facetron web: login {args.add_login!r} set in {path} (scrypt hash, mode 0600)", flush=True)
    return 0


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from facetron.web.app import close, launch

    if args.add_login:
        return add_login(args)
    auth = authenticator(args)
    config = replace(web_config(args), login=auth is not None)
    if auth is None and args.host != LOOPBACK:
        from facetron.errors import InvalidInputError
        raise InvalidInputError("--no-login", f"serves {LOOPBACK} only, not {args.host}: configure logins")
    config.work_dir.mkdir(parents=True, exist_ok=True)
    stop = {"now": False}

    def _handle(signum: int, _frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, _handle)
    signal.signal(signal.SIGINT, _handle)
    app = launch(config, host=args.host, port=args.port, block=False, auth=auth)
    print(f"facetron web: http://{args.host}:{args.port}/  (Triton gRPC {config.server}; work {config.work_dir})",
          flush=True)
    if auth is None:
        print("facetron web: NO LOGIN (--no-login): single-user local use; anyone on this machine can use the "
              f"page as any user id; bound to {LOOPBACK} only", flush=True)
    else:
        print(f"facetron web: login required; {len(auth.users)} login(s) from {_credentials_path(args)}; "
              "each session acts only as its user", flush=True)
    try:
        while not stop["now"]:
            time.sleep(0.5)
    finally:
        stopped = close(app)
    print(f"facetron web: stopped ({stopped} training stage(s) ended)", flush=True)
    return 0
