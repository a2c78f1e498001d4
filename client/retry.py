"""Retries of one call to one server: the policy (:class:`RetryPolicy`), the
bookkeeping (:class:`CallInfo`, :class:`ClientStats`) and the plan both
front ends follow (:class:`RetryPlan`).

Only UNAVAILABLE is retried: a bad input or a missing model fails the same
way every time, retrying it only adds load. The plan decides, the driver
only sleeps — ``time.sleep`` in the threaded client, ``await asyncio.sleep``
in the asyncio one::

    plan = RetryPlan(policy, stats)
    while True:
        try:
            out = infer_once()
        except FacetronError as err:
            time.sleep(plan.retry_after(err))  # raises the call's error when it gives up
        else:
            return out, plan.succeeded(url)
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from facetron.client.errors import gave_up, is_unavailable
from facetron.errors import FacetronError, InvalidInputError


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff and jitter, on UNAVAILABLE only.

    ``attempts`` counts every try (1 = no retry). The n-th retry waits
    ``min(max_backoff_s, backoff_s * multiplier**n)`` scaled down by up to
    ``jitter`` (a random fraction), so clients that failed together do not
    come back together. A server pool makes ``attempts`` rounds over its
    servers and waits the same between rounds.
    """

    attempts: int = 4
    backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise InvalidInputError("retry.attempts", f"must be >= 1, got {self.attempts}")
        if self.backoff_s < 0 or self.max_backoff_s < 0 or self.multiplier < 1 or not 0 <= self.jitter <= 1:
            raise InvalidInputError("retry", "needs backoff_s >= 0, max_backoff_s >= 0, multiplier >= 1, 0 <= jitter <= 1")

    def delay(self, retry_index: int) -> float:
        """Seconds to wait before retry number ``retry_index`` (0-based)."""
        base = min(self.max_backoff_s, self.backoff_s * self.multiplier**retry_index)
        return base * (1.0 - self.jitter * random.random())


NO_RETRY = RetryPolicy(attempts=1)


@dataclass(frozen=True)
class CallInfo:
    """How one call went: the server that answered, tries made, wall time."""

    server: str
    attempts: int
    elapsed_s: float


@dataclass
class ClientStats:
    """Counters of a client (thread-safe): calls, attempts (incl. retries), failed calls."""

    calls: int = 0
    attempts: int = 0
    failures: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, calls: int = 0, attempts: int = 0, failures: int = 0) -> None:
        with self._lock:
            self.calls += calls
            self.attempts += attempts
            self.failures += failures

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {"calls": self.calls, "attempts": self.attempts, "failures": self.failures}


class RetryPlan:
    """One call to one server under ``policy`` (see the module doc).

    ``attempt`` is the number of the try under way (1-based). Every finished
    try is counted in ``stats``; so is the call, once, when it ends.
    """

    def __init__(self, policy: RetryPolicy, stats: ClientStats, clock: Callable[[], float] = time.perf_counter):
        self.policy = policy
        self.stats = stats
        self.attempt = 1
        self._clock = clock
        self._start = clock()

    def retry_after(self, err: FacetronError) -> float:
        """Seconds to wait before the next try after ``err``; raises the call's
        error instead when ``err`` is not worth retrying or no try is left."""
        self.stats.add(attempts=1)
        if self.attempt >= self.policy.attempts or not is_unavailable(err):
            self.stats.add(calls=1, failures=1)
            raise gave_up(err, self.attempt) from None
        delay = self.policy.delay(self.attempt - 1)
        self.attempt += 1
        return delay

    def succeeded(self, url: str) -> CallInfo:
        """Count the answer; how the call went."""
        self.stats.add(attempts=1, calls=1)
        return CallInfo(url, self.attempt, self._clock() - self._start)
