"""Several Triton servers as one client: load spreading and failover.

:class:`ServerPool` (threads) and :class:`AsyncServerPool` (asyncio) take a
list of ``host:port`` servers serving the same models and offer the
client's methods (``infer``, ``tokenize``, ``select``, ``portrait`` ...).

* Spreading: calls go round-robin over the healthy servers.
* Failover: a call that fails with UNAVAILABLE (connection refused or reset,
  server stopping, model not loaded) is sent to the next server at once; a
  bad input or a missing model is not (every replica would say the same).
* Health: a failed server sits out ``cooldown_s``; then one caller probes it
  (``is_server_ready``, ``probe_timeout_s``) and, if ready, it is back.
  When every server is cooling down they are all tried anyway.
* Bounds: ``retry.attempts`` rounds over the servers, with backoff between
  rounds; then a ServerError naming every server and its last error.

The per-server clients do not retry themselves (the pool does), and their
gRPC reconnect backoff is capped at the cool-down so a server that comes
back is reachable when its probe is due.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from facetron.client.aio_client import AsyncClientAPI, AsyncFacetronClient
from facetron.client.grpc_client import (
    NO_RETRY,
    CallInfo,
    ClientAPI,
    ClientStats,
    FacetronClient,
    RetryPolicy,
    check_url,
    is_unavailable,
)
from facetron.errors import FacetronError, InvalidInputError, ServerError


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


@dataclass
class ServerState:
    url: str
    healthy: bool = True
    probe_at: float = 0.0  # monotonic time an unhealthy server may be probed again
    served: int = 0  # calls this server answered
    failures: int = 0  # UNAVAILABLE answers / failed probes
    last_error: str = ""


class Balancer:
    """Round-robin order over healthy servers, with cool-down and probes (thread-safe)."""

    def __init__(self, urls: Sequence[str], cooldown_s: float):
        self.states = [ServerState(u) for u in urls]
        self.cooldown_s = cooldown_s
        self._rr = itertools.count()
        self._lock = threading.Lock()

    def plan(self) -> list[tuple[ServerState, bool]]:
        """Servers to try for one call, in order, each with "probe first?".

        Unhealthy servers whose cool-down ended come first, claimed by this
        caller (others see the next cool-down), so they are re-probed even
        while the healthy ones answer everything."""
        with self._lock:
            now = time.monotonic()
            start = next(self._rr) % len(self.states)
            rotated = self.states[start:] + self.states[:start]
            probes = []
            for s in rotated:
                if not s.healthy and now >= s.probe_at:
                    s.probe_at = now + self.cooldown_s
                    probes.append((s, True))
            plan = probes + [(s, False) for s in rotated if s.healthy]
            return plan or [(s, False) for s in rotated]

    def down(self, state: ServerState, reason: str) -> None:
        with self._lock:
            state.healthy = False
            state.probe_at = time.monotonic() + self.cooldown_s
            state.failures += 1
            state.last_error = reason

    def up(self, state: ServerState) -> None:
        with self._lock:
            state.healthy = True

    def served(self, state: ServerState) -> None:
        with self._lock:
            state.healthy = True
            state.served += 1

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {
                s.url: {"served": s.served, "failures": s.failures, "healthy": s.healthy, "last_error": s.last_error}
                for s in self.states
            }


def _no_server(urls: Sequence[str], errors: dict[str, str], tries: int) -> ServerError:
    detail = "; ".join(errors.get(u, f"{u}: not tried") for u in urls)
    err = ServerError(f"no server could serve the call ({tries} tries over {len(urls)} servers): {detail}")
    err.status = "UNAVAILABLE"
    return err


class _PoolBase:
    def __init__(
        self,
        servers: str | Sequence[str],
        timeout_s: float,
        retry: RetryPolicy | None,
        cooldown_s: float,
        probe_timeout_s: float,
    ):
        self.urls = parse_servers(servers)
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self.cooldown_s = cooldown_s
        self.probe_timeout_s = probe_timeout_s
        self.balancer = Balancer(self.urls, cooldown_s)
        self.stats = ClientStats()

    def server_stats(self) -> dict[str, dict[str, Any]]:
        """Per server: calls served, failures, health, last error."""
        return self.balancer.snapshot()

    def servers_used(self) -> list[str]:
        return [u for u, s in self.server_stats().items() if s["served"]]


class ServerPool(_PoolBase, ClientAPI):
    """Thread-safe client over several servers (see the module doc)."""

    def __init__(
        self,
        servers: str | Sequence[str],
        timeout_s: float = 60.0,
        retry: RetryPolicy | None = None,
        *,
        cooldown_s: float = 2.0,
        probe_timeout_s: float = 1.0,
    ):
        super().__init__(servers, timeout_s, retry, cooldown_s, probe_timeout_s)
        backoff_ms = int(cooldown_s * 1000)
        self.clients = {u: FacetronClient(u, timeout_s, NO_RETRY, reconnect_backoff_ms=backoff_ms) for u in self.urls}

    def close(self) -> None:
        for c in self.clients.values():
            c.close()

    def __enter__(self) -> "ServerPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def is_ready(self, timeout_s: float | None = None) -> bool:
        """True when at least one server is ready."""
        return any(c.is_ready(timeout_s or self.probe_timeout_s) for c in self.clients.values())

    def model_ready(self, model: str, timeout_s: float | None = None) -> bool:
        return any(c.model_ready(model, timeout_s or self.probe_timeout_s) for c in self.clients.values())

    def infer_with_info(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        *,
        timeout_s: float | None = None,
        use_shm: bool = False,
        shm_output_bytes: int | Mapping[str, int] | None = None,
    ) -> tuple[dict[str, np.ndarray], CallInfo]:
        start, tries, errors = time.perf_counter(), 0, {}
        for round_ in range(self.retry.attempts):
            if round_:
                time.sleep(self.retry.delay(round_ - 1))
            for state, probe in self.balancer.plan():
                client = self.clients[state.url]
                if probe:
                    if not client.is_ready(self.probe_timeout_s):
                        self.balancer.down(state, "not ready when probed")
                        continue
                    self.balancer.up(state)
                tries += 1
                self.stats.add(attempts=1)
                try:
                    out, _ = client.infer_with_info(
                        model, inputs, outputs, timeout_s=timeout_s, use_shm=use_shm, shm_output_bytes=shm_output_bytes
                    )
                except FacetronError as err:
                    if not is_unavailable(err):
                        self.stats.add(calls=1, failures=1)
                        raise
                    self.balancer.down(state, str(err))
                    errors[state.url] = str(err)
                    continue
                self.balancer.served(state)
                self.stats.add(calls=1)
                return out, CallInfo(state.url, tries, time.perf_counter() - start)
        self.stats.add(calls=1, failures=1)
        raise _no_server(self.urls, errors, tries)


class AsyncServerPool(_PoolBase, AsyncClientAPI):
    """asyncio client over several servers (see the module doc); one event loop."""

    def __init__(
        self,
        servers: str | Sequence[str],
        timeout_s: float = 60.0,
        retry: RetryPolicy | None = None,
        *,
        cooldown_s: float = 2.0,
        probe_timeout_s: float = 1.0,
    ):
        super().__init__(servers, timeout_s, retry, cooldown_s, probe_timeout_s)
        backoff_ms = int(cooldown_s * 1000)
        self.clients = {u: AsyncFacetronClient(u, timeout_s, NO_RETRY, reconnect_backoff_ms=backoff_ms) for u in self.urls}

    async def close(self) -> None:
        for c in self.clients.values():
            await c.close()

    async def __aenter__(self) -> "AsyncServerPool":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def is_ready(self, timeout_s: float | None = None) -> bool:
        answers = await asyncio.gather(*(c.is_ready(timeout_s or self.probe_timeout_s) for c in self.clients.values()))
        return any(answers)

    async def model_ready(self, model: str, timeout_s: float | None = None) -> bool:
        answers = await asyncio.gather(*(c.model_ready(model, timeout_s or self.probe_timeout_s) for c in self.clients.values()))
        return any(answers)

    async def infer_with_info(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        *,
        timeout_s: float | None = None,
        use_shm: bool = False,
        shm_output_bytes: int | Mapping[str, int] | None = None,
    ) -> tuple[dict[str, np.ndarray], CallInfo]:
        start, tries, errors = time.perf_counter(), 0, {}
        for round_ in range(self.retry.attempts):
            if round_:
                await asyncio.sleep(self.retry.delay(round_ - 1))
            for state, probe in self.balancer.plan():
                client = self.clients[state.url]
                if probe:
                    if not await client.is_ready(self.probe_timeout_s):
                        self.balancer.down(state, "not ready when probed")
                        continue
                    self.balancer.up(state)
                tries += 1
                self.stats.add(attempts=1)
                try:
                    out, _ = await client.infer_with_info(
                        model, inputs, outputs, timeout_s=timeout_s, use_shm=use_shm, shm_output_bytes=shm_output_bytes
                    )
                except FacetronError as err:
                    if not is_unavailable(err):
                        self.stats.add(calls=1, failures=1)
                        raise
                    self.balancer.down(state, str(err))
                    errors[state.url] = str(err)
                    continue
                self.balancer.served(state)
                self.stats.add(calls=1)
                return out, CallInfo(state.url, tries, time.perf_counter() - start)
        self.stats.add(calls=1, failures=1)
        raise _no_server(self.urls, errors, tries)
