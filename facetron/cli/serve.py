"""``facetron serve``: run tritonserver on loopback until interrupted."""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

from facetron.cli.options import under_data_root
from facetron.errors import ServerError
from facetron.triton.server import ADMIN_HEADER, GRPC_ADMIN_HEADER, LOOPBACK, TritonServer

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
    p.add_argument("--log", type=Path, default=None, help="server log file (default: a temp file)")
    p.add_argument("--startup-timeout", type=float, default=120.0, help="seconds to wait for the server to be ready")
    p.add_argument("--admin-key-file", type=Path, default=under_data_root("admin-key"),
                   help="explicit control: where the key for the restricted repository and shared-memory "
                        "APIs is written (mode 0600; default: %(default)s); $FACETRON_ADMIN_KEY sets the key")
    p.set_defaults(func=run)


def write_admin_key(path: Path, key: str) -> None:
    """The key for the restricted APIs, readable by this user only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    os.chmod(path, 0o600)


def run(args: argparse.Namespace) -> int:
    server = TritonServer(
        args.repo,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        host=args.host,
        model_control_mode=args.model_control,
        load_models=args.load_model,
        log_path=args.log,
        startup_timeout_s=args.startup_timeout,
    )
    if os.environ.get("FACETRON_ADMIN_KEY"):
        server.admin_key = os.environ["FACETRON_ADMIN_KEY"]
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
        if args.model_control == "explicit":
            write_admin_key(args.admin_key_file, server.admin_key)
            print(f"model-repository and shared-memory APIs need the key in {args.admin_key_file}: "
                  f"gRPC metadata {GRPC_ADMIN_HEADER}, HTTP header {ADMIN_HEADER}", flush=True)
        while not stop["now"]:
            if not server.is_running():
                raise ServerError(f"tritonserver exited unexpectedly (log: {server.log_path})")
            time.sleep(0.5)
    print("tritonserver stopped", flush=True)
    return 0
