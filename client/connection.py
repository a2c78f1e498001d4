"""Where a client connects: ``host:port`` checks, gRPC channel options, the
loopback rule of system shared memory, and the settings every one-server
client holds (:class:`OneServer`)."""

from __future__ import annotations

import os

from typing import Any, Sequence

import tritonclient.grpc as grpcclient

from facetron.client.retry import ClientStats, RetryPolicy
from facetron.contract import ADMIN_KEY_ENV, GRPC_ADMIN_HEADER
from facetron.errors import InvalidInputError

DEFAULT_URL = "127.0.0.1:8001"
MAX_MESSAGE_BYTES = 2**31 - 1


def channel_args(reconnect_backoff_ms: int | None = None) -> list[tuple[str, Any]]:
    """tritonclient's default channel options (large messages, keepalive), plus
    an optional cap on gRPC's reconnect backoff so a restarted server is seen
    again within about that time (gRPC's own default grows up to 120 s)."""
    ka = grpcclient.KeepAliveOptions()
    args: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", ka.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", ka.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", ka.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", ka.http2_max_pings_without_data),
    ]
    if reconnect_backoff_ms is not None:
        ms = max(int(reconnect_backoff_ms), 100)
        args += [
            ("grpc.initial_reconnect_backoff_ms", min(ms, 1000)),
            ("grpc.min_reconnect_backoff_ms", min(ms, 1000)),
            ("grpc.max_reconnect_backoff_ms", ms),
        ]
    return args


def check_url(url: str, name: str = "url") -> str:
    """``host:port`` with a port in 1..65535, else InvalidInputError naming ``name``."""
    host, sep, port = str(url).strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInputError(name, f"{url!r} is not host:port (e.g. 127.0.0.1:8001)")
    return f"{host}:{port}"


def parse_servers(servers: str | Sequence[str], name: str = "servers") -> list[str]:
    """``"h:p,h:p"`` or a list of ``host:port`` -> validated, de-duplicated list."""
    items = servers.split(",") if isinstance(servers, str) else list(servers)
    urls: list[str] = []
    for item in items:
        if str(item).strip():
            url = check_url(item, name)
            if url not in urls:
                urls.append(url)
    if not urls:
        raise InvalidInputError(name, "give at least one host:port")
    return urls


def is_local(url: str) -> bool:
    host = url.rpartition(":")[0].strip("[]").lower()
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def require_local(url: str) -> None:
    if not is_local(url):
        raise InvalidInputError(
            "use_shm", f"system shared memory needs a server on this machine; {url} is not a loopback address"
        )


class OneServer:
    """What a client of one server holds besides its gRPC stub: the checked
    url, the default per-attempt timeout, the retry policy, the counters,
    the channel options and the shared-memory regions the server still held
    after a call (unregistered on the next shared-memory call and on close)."""

    def __init__(self, url: str, timeout_s: float, retry: RetryPolicy | None, reconnect_backoff_ms: int | None):
        self.url = check_url(url)
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self.stats = ClientStats()
        self._shm_pending: set[str] = set()
        self._channel_args = channel_args(reconnect_backoff_ms)
        # shared-memory registration is one of Triton's restricted APIs: the admin key ($FACETRON_ADMIN_KEY)
        # goes with those calls only, never with inference
        key = os.environ.get(ADMIN_KEY_ENV, "")
        self._admin_headers: dict[str, str] | None = {GRPC_ADMIN_HEADER: key} if key else None

    def _timeout(self, timeout_s: float | None) -> float:
        return self.timeout_s if timeout_s is None else timeout_s
