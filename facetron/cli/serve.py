"""``facetron serve``: run tritonserver on loopback until interrupted."""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
import time
from pathlib import Path

from facetron.cli.options import under_data_root
from facetron.errors import ServerError
from facetron.triton.server import (
    ADMIN_HEADER,
    ADMIN_KEY_ENV,
    GRPC_ADMIN_HEADER,
    LOOPBACK,
    RESTRICTED_APIS,
    TritonServer,
    base_models,
    find_triton,
    prepare_backend_dir,
)

#: tritonserver's --model-control-mode values
MODEL_CONTROL_MODES = ("none", "explicit", "poll")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="start tritonserver on a model repository (127.0.0.1)")
    p.add_argument("--repo", type=Path, default=under_data_root("model_repository"),
                   help="an assembled model repository (`facetron export repository`; default: %(default)s)")
    p.add_argument("--host", default=LOOPBACK, help="bind address (loopback unless FACETRON_ALLOW_PUBLIC_BIND=1)")
    p.add_argument("--grpc-port", type=int, default=None, help="gRPC port (default: a free one)")
    p.add_argument("--http-port", type=int, default=None, help="HTTP port (default: a free one)")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus metrics port (default: a free one)")
    p.add_argument("--model-control", choices=MODEL_CONTROL_MODES, default=MODEL_CONTROL_MODES[0],
                   help="tritonserver's model control: none loads every model at start; explicit loads on request "
                        "(merged users; the repository API needs the admin key); poll watches the repository")
    p.add_argument("--load-model", action="append", default=[], help="with explicit control: model to load")
    p.add_argument("--load-base-models", action="store_true",
                   help="with explicit control: load every model except merged users' unet_user_* "
                        "(those load on first use, at most max_merged_models at once)")
    p.add_argument("--log", type=Path, default=None, help="server log file (default: a temp file)")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for the server to be ready")
    p.add_argument("--admin-key-file", type=Path, default=under_data_root("admin-key"),
                   help=f"the key of Triton's non-inference APIs ({', '.join(RESTRICTED_APIS)}): "
                        f"${ADMIN_KEY_ENV} if set, else read from this file, else a random key written "
                        "to it (mode 0600; default: %(default)s)")
    p.add_argument("--exec", dest="exec_binary", type=Path, default=None, metavar="TRITONSERVER",
                   help="containers: become TRITONSERVER (e.g. /opt/tritonserver/bin/tritonserver) with these "
                        "flags instead of supervising the wheel's server; ports must be given")
    p.add_argument("--backend-directory", type=Path, default=None,
                   help="with --exec: the server's backends (default: the wheel's python backend)")
    p.add_argument("--no-user-tokens", dest="user_tokens", action="store_false",
                   help="single-user local use: any caller may act as any registered user (no per-user token "
                        "check; said in the log). By default each request needs its user's token")
    p.add_argument("--print-command", action="store_true",
                   help="print the tritonserver command, one argument a line (the admin key as ***), and exit")
    p.set_defaults(func=run)


def write_admin_key(path: Path, key: str) -> None:
    """The key for the restricted APIs, readable by this user only (written to a temp name, then renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    os.replace(tmp, path)


def admin_key(path: Path) -> tuple[str, str]:
    """(key, where it came from): $FACETRON_ADMIN_KEY, else the file, else a new random key written there."""
    if os.environ.get(ADMIN_KEY_ENV):
        return os.environ[ADMIN_KEY_ENV].strip(), f"${ADMIN_KEY_ENV}"
    if path.is_file():
        key = path.read_text().strip()
        if not key:
            raise ServerError(f"--admin-key-file {path}: the file is empty")
        return key, str(path)
    key = secrets.token_hex(16)
    write_admin_key(path, key)
    return key, str(path)


def server_from_args(args: argparse.Namespace) -> TritonServer:
    """The launcher `facetron serve` starts for ``args`` (also what tests/test_launch_commands.py reads)."""
    load = list(args.load_model)
    if args.load_base_models:
        if args.model_control != "explicit":
            raise ServerError("--load-base-models: only with --model-control explicit")
        load += [m for m in base_models(args.repo) if m not in load]
    server = TritonServer(
        args.repo,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        host=args.host,
        model_control_mode=args.model_control,
        load_models=load,
        log_path=args.log,
        startup_timeout_s=args.startup_timeout,
        user_tokens=args.user_tokens,
    )
    server.admin_key, args.admin_key_source = admin_key(args.admin_key_file)
    return server


def run(args: argparse.Namespace) -> int:
    server = server_from_args(args)
    if not server.user_tokens:
        print("WARNING: --no-user-tokens: per-user tokens are OFF; any caller can generate as any registered user "
              "(single-user local use only)", file=sys.stderr, flush=True)
    if args.exec_binary or args.print_command:
        binary, backend_dir = args.exec_binary, args.backend_directory
        if binary is None or backend_dir is None:
            install = find_triton()
            binary, backend_dir = binary or install.binary, backend_dir or prepare_backend_dir(install)
        if args.print_command:
            print("\n".join(a.replace(server.admin_key, "***") for a in server.argv(binary, backend_dir)))
            return 0
        server.exec(binary, backend_dir)  # returns only by an error
    stop = {"now": False}

    def _handle(signum: int, _frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, _handle)
    signal.signal(signal.SIGINT, _handle)
    with server:
        print(
            f"tritonserver ready: grpc {server.grpc_url}  http {server.http_url}  "
            f"metrics {server.host}:{server.metrics_port}  log {server.log_path}",
            flush=True,
        )
        print(f"{', '.join(RESTRICTED_APIS)} APIs need the key from {args.admin_key_source}: "
              f"gRPC metadata {GRPC_ADMIN_HEADER}, HTTP header {ADMIN_HEADER}", flush=True)
        while not stop["now"]:
            if not server.is_running():
                raise ServerError(f"tritonserver exited unexpectedly (log: {server.log_path})")
            time.sleep(0.5)
    print("tritonserver stopped", flush=True)
    return 0
