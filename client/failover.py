"""Failover over several servers: server health (:class:`Balancer`) and the
rounds of one call (:class:`FailoverPlan`), shared by
:class:`~facetron.client.pool.ServerPool` and
:class:`~facetron.client.pool.AsyncServerPool`.

A call makes ``retry.attempts`` rounds; each round goes over the servers in
the balancer's order (round-robin over the healthy ones, due probes first).
An UNAVAILABLE answer marks the server down and moves on to the next one at
once; any other error ends the call (every replica would say the same).
Between rounds the plan waits ``retry.delay``. The plan decides, the driver
only sleeps, probes and calls::

    plan = FailoverPlan(policy, balancer, stats)
    for step in plan:
        if step.wait_s:
            time.sleep(step.wait_s)
            continue
        client = clients[step.url]
        if step.probe and not plan.probed(step, client.is_ready(probe_timeout_s)):
            continue
        try:
            out, _ = client.infer_with_info(...)
        except FacetronError as err:
            if plan.fails_over(step, err):
                continue
            raise
        return out, plan.served(step)
    raise plan.exhausted()
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from facetron.client.errors import is_unavailable, no_server
from facetron.client.retry import CallInfo, ClientStats, RetryPolicy
from facetron.errors import FacetronError, ServerError


@dataclass
class ServerState:
    url: str
    healthy: bool = True
    probe_at: float = 0.0  # monotonic time an unhealthy server may be probed again
    served: int = 0  # calls this server answered
    failures: int = 0  # UNAVAILABLE answers / failed probes
    last_error: str = ""


class Balancer:
    """Round-robin order over healthy servers, with cool-down and probes (thread-safe).

    A failed server sits out ``cooldown_s``; then one caller probes it and,
    if ready, it is back. When every server is down they are all tried."""

    def __init__(self, urls: Sequence[str], cooldown_s: float, clock: Callable[[], float] = time.monotonic):
        self.states = [ServerState(u) for u in urls]
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._rr = itertools.count()
        self._lock = threading.Lock()

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.states]

    def plan(self) -> list[tuple[ServerState, bool]]:
        """Servers to try for one round, in order, each with "probe first?".

        Unhealthy servers whose cool-down ended come first, claimed by this
        caller (others see the next cool-down), so they are re-probed even
        while the healthy ones answer everything."""
        with self._lock:
            now = self._clock()
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
            state.probe_at = self._clock() + self.cooldown_s
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


@dataclass(frozen=True)
class Step:
    """One step of a call: wait ``wait_s`` seconds (between rounds), or try
    ``server`` — probing it first when ``probe``."""

    wait_s: float = 0.0
    server: ServerState | None = None
    probe: bool = False

    @property
    def url(self) -> str:
        assert self.server is not None, "a wait step has no server"
        return self.server.url


class FailoverPlan:
    """The rounds of one call over the balancer's servers (see the module doc).

    ``tries`` counts the calls made to servers (probes not included); each is
    counted in ``stats`` as an attempt, and the call once when it ends."""

    def __init__(
        self,
        policy: RetryPolicy,
        balancer: Balancer,
        stats: ClientStats,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.policy = policy
        self.balancer = balancer
        self.stats = stats
        self.tries = 0
        self.errors: dict[str, str] = {}  # url -> its last UNAVAILABLE error in this call
        self._clock = clock
        self._start = clock()

    def __iter__(self) -> Iterator[Step]:
        for round_ in range(self.policy.attempts):
            if round_:
                wait = self.policy.delay(round_ - 1)
                if wait > 0:
                    yield Step(wait_s=wait)
            # planned after the wait: a cool-down that ended meanwhile gets its probe
            for state, probe in self.balancer.plan():
                yield Step(server=state, probe=probe)

    def probed(self, step: Step, ready: bool) -> bool:
        """Record a probe's answer; True when the server may be tried."""
        assert step.server is not None
        if ready:
            self.balancer.up(step.server)
        else:
            self.balancer.down(step.server, "not ready when probed")
        return ready

    def fails_over(self, step: Step, err: FacetronError) -> bool:
        """Record a failed try; True when the call goes on to the next server
        (UNAVAILABLE), False when ``err`` ends it."""
        assert step.server is not None
        self.tries += 1
        self.stats.add(attempts=1)
        if not is_unavailable(err):
            self.stats.add(calls=1, failures=1)
            return False
        self.balancer.down(step.server, str(err))
        self.errors[step.url] = str(err)
        return True

    def served(self, step: Step) -> CallInfo:
        """Record the answer; how the call went."""
        assert step.server is not None
        self.tries += 1
        self.stats.add(attempts=1, calls=1)
        self.balancer.served(step.server)
        return CallInfo(step.url, self.tries, self._clock() - self._start)

    def exhausted(self) -> ServerError:
        """The error of a call whose rounds all failed (counted as a failed call)."""
        self.stats.add(calls=1, failures=1)
        return no_server(self.balancer.urls, self.errors, self.tries)
