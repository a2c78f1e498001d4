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

The decisions are :class:`~facetron.client.failover.FailoverPlan`'s, shared
by both pools; each pool only sleeps, probes and calls.

The per-server clients do not retry themselves (the pool does), and their
gRPC reconnect backoff is capped at the cool-down so a server that comes
back is reachable when its probe is due.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Mapping, Sequence

import numpy as np

from facetron.client.aio_client import AsyncFacetronClient
from facetron.client.api import AsyncClientAPI, ClientAPI
from facetron.client.connection import parse_servers
from facetron.client.failover import Balancer, FailoverPlan, ServerState
from facetron.client.grpc_client import FacetronClient
from facetron.client.retry import NO_RETRY, CallInfo, ClientStats, RetryPolicy
from facetron.errors import FacetronError

__all__ = ["AsyncServerPool", "Balancer", "ServerPool", "ServerState", "parse_servers"]


class _PoolBase:
    """Settings, health and per-server clients (of type ``_client_type``) of a pool."""

    _client_type: Any = None

    def __init__(
        self,
        servers: str | Sequence[str],
        timeout_s: float = 60.0,
        retry: RetryPolicy | None = None,
        *,
        cooldown_s: float = 2.0,
        probe_timeout_s: float = 1.0,
    ):
        self.urls = parse_servers(servers)
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self.cooldown_s = cooldown_s
        self.probe_timeout_s = probe_timeout_s
        self.balancer = Balancer(self.urls, cooldown_s)
        self.stats = ClientStats()
        backoff_ms = int(cooldown_s * 1000)
        self.clients = {u: self._client_type(u, timeout_s, NO_RETRY, reconnect_backoff_ms=backoff_ms) for u in self.urls}

    def server_stats(self) -> dict[str, dict[str, Any]]:
        """Per server: calls served, failures, health, last error."""
        return self.balancer.snapshot()

    def servers_used(self) -> list[str]:
        return [u for u, s in self.server_stats().items() if s["served"]]


class ServerPool(_PoolBase, ClientAPI):
    """Thread-safe client over several servers (see the module doc)."""

    _client_type = FacetronClient

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

    # twin: pool.AsyncServerPool.infer_with_info
    def infer_with_info(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        *,
        timeout_s: float | None = None,
        use_shm: bool = False,
        shm_output_bytes: int | Mapping[str, int] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[dict[str, np.ndarray], CallInfo]:
        """One call: servers tried as the failover plan says; the outputs and how it went."""
        plan = FailoverPlan(self.retry, self.balancer, self.stats)
        for step in plan:
            if step.wait_s:
                time.sleep(step.wait_s)
                continue
            client = self.clients[step.url]
            if step.probe and not plan.probed(step, client.is_ready(self.probe_timeout_s)):
                continue
            try:
                out, _ = client.infer_with_info(
                    model, inputs, outputs, timeout_s=timeout_s, use_shm=use_shm, shm_output_bytes=shm_output_bytes,
                    headers=headers,
                )
            except FacetronError as err:
                if plan.fails_over(step, err):
                    continue
                raise
            return out, plan.served(step)
        raise plan.exhausted()


class AsyncServerPool(_PoolBase, AsyncClientAPI):
    """asyncio client over several servers (see the module doc); one event loop."""

    _client_type = AsyncFacetronClient

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

    # twin: pool.ServerPool.infer_with_info
    async def infer_with_info(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        *,
        timeout_s: float | None = None,
        use_shm: bool = False,
        shm_output_bytes: int | Mapping[str, int] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[dict[str, np.ndarray], CallInfo]:
        plan = FailoverPlan(self.retry, self.balancer, self.stats)
        for step in plan:
            if step.wait_s:
                await asyncio.sleep(step.wait_s)
                continue
            client = self.clients[step.url]
            if step.probe and not plan.probed(step, await client.is_ready(self.probe_timeout_s)):
                continue
            try:
                out, _ = await client.infer_with_info(
                    model, inputs, outputs, timeout_s=timeout_s, use_shm=use_shm, shm_output_bytes=shm_output_bytes,
                    headers=headers,
                )
            except FacetronError as err:
                if plan.fails_over(step, err):
                    continue
                raise
            return out, plan.served(step)
        raise plan.exhausted()
