"""``facetron serve``: run tritonserver on loopback until interrupted."""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path

from facetron.errors import ServerError
from facetron.paths import DEFAULT_REPOSITORY
from facetron.triton_server import LOOPBACK, TritonServer


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="start tritonserver on a model repository (127.0.0.1)")
    p.add_argument("--repo", type=Path, default=DEFAULT_REPOSITORY,
                   help="an assembled model repository (`facetron export repository`; default: %(default)s)")
    p.add_argument("--host", default=LOOPBACK, help="bind address (loopback unless FACETRON_ALLOW_PUBLIC_BIND=1)")
    p.add_argument("--grpc-port", type=int, default=None, help="gRPC port (default: a free one)")
    p.add_argument("--http-port", type=int, default=None)
    p.add_argument("--metrics-port", type=int, default=None)
    p.add_argument("--model-control", choices=["none", "explicit", "poll"], default="none")
    p.add_argument("--load-model", action="append", default=[], help="with explicit control: model to load")
    p.add_argument("--log", type=Path, default=None, help="server log file (default: a temp file)")
    p.add_argument("--startup-timeout", type=float, default=120.0)
    p.set_defaults(func=run)


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
        while not stop["now"]:
            if not server.is_running():
                raise ServerError(f"tritonserver exited unexpectedly (log: {server.log_path})")
            time.sleep(0.5)
    print("tritonserver stopped", flush=True)
    return 0
