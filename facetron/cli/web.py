"""``facetron web``: the web app (Gradio) for people, over a Triton server's gRPC API.

The page talks to Triton only through :mod:`facetron.client`; preparing and
training run as subprocesses of ``facetron train`` (no model code in the web
process). It binds 127.0.0.1 unless FACETRON_ALLOW_PUBLIC_BIND=1 and --host.
"""

from __future__ import annotations

import argparse
import os
import signal
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
    p.set_defaults(func=run)


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


def run(args: argparse.Namespace) -> int:
    from facetron.web.app import launch

    config = web_config(args)
    config.work_dir.mkdir(parents=True, exist_ok=True)
    stop = {"now": False}

    def _handle(signum: int, _frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, _handle)
    signal.signal(signal.SIGINT, _handle)
    app = launch(config, host=args.host, port=args.port, block=False)
    print(f"facetron web: http://{args.host}:{args.port}/  (Triton gRPC {config.server}; work {config.work_dir})",
          flush=True)
    try:
        while not stop["now"]:
            time.sleep(0.5)
    finally:
        app.close()
    print("facetron web: stopped", flush=True)
    return 0
