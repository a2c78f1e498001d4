"""Timing helpers: warm-up excluded, percentiles, side-by-side ratios."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 1) -> np.ndarray:
    """Seconds per call for ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    out = np.empty(repeats)
    for i in range(repeats):
        t0 = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - t0
    return out


def summarize(seconds: np.ndarray) -> dict[str, float]:
    """ms statistics of a timing sample."""
    ms = np.asarray(seconds) * 1e3
    return {
        "n": int(ms.size),
        "mean_ms": round(float(ms.mean()), 3),
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p90_ms": round(float(np.percentile(ms, 90)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "min_ms": round(float(ms.min()), 3),
    }


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, np.ndarray]:
    """Time several functions alternately (A B A B ...) so machine noise hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {k: np.empty(repeats) for k in fns}
    for i in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name][i] = time.perf_counter() - t0
    return samples


class StepTimer:
    """A training run's ``callback``: the seconds of each step (from :meth:`start`, then between callbacks)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._last = time.perf_counter()

    def start(self) -> float:
        """Now, as the start of the first step (returned)."""
        self._last = time.perf_counter()
        return self._last

    def __call__(self, step: int, loss: float, *rest) -> None:
        now = time.perf_counter()
        self.times.append(now - self._last)
        self._last = now
