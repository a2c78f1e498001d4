"""Sampled resident memory of this process (and its children), peak per stage of a long command.

``ru_maxrss`` gives one peak for the whole process lifetime; a long command
(``export repository``: export, then the runtime choice per net, then the
repository written) needs to know *which* stage peaked. :class:`RssMonitor`
samples the resident set size (``VmRSS`` of this process + its children's,
read through psutil) in a daemon thread every ``interval_s`` and on every
stage boundary, and keeps the peak of each stage that was open when a sample
was taken (stages nest: an inner stage's samples count for the outer too).
A sample is a few microseconds; between samples a short spike can be missed,
so the numbers are a lower bound of the true peak, reported as "sampled".
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator

#: seconds between samples
DEFAULT_INTERVAL_S = 0.5
#: the key of the whole monitored span in :meth:`RssMonitor.peaks_gib`
OVERALL = "overall"


def group_rss_bytes(pid: int | None = None) -> int:
    """Resident bytes of process ``pid`` (None = this one) and all its descendants; 0 when it is gone."""
    import psutil

    try:
        proc = psutil.Process(pid)
        total = proc.memory_info().rss
        children = proc.children(recursive=True)
    except psutil.Error:
        return 0
    for child in children:
        try:
            total += child.memory_info().rss
        except psutil.Error:  # ended between the listing and the read
            continue
    return total


class RssMonitor:
    """``with RssMonitor() as rss: with rss.stage("export"): ...`` then ``rss.peaks_gib()`` (and each
    stage's wall seconds, ``rss.seconds()``)."""

    def __init__(self, interval_s: float = DEFAULT_INTERVAL_S):
        self.interval_s = interval_s
        self._peaks: dict[str, int] = {}  # stage -> peak bytes (insertion order = the order stages began)
        self._seconds: dict[str, float] = {}  # stage -> wall seconds (summed when a stage name repeats)
        self._open: list[str] = []  # the stages open now, outermost first
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "RssMonitor":
        self.sample()
        self._thread = threading.Thread(target=self._run, name="rss-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> int:
        """Take one sample now; it counts for the whole span and for every open stage."""
        rss = group_rss_bytes()
        with self._lock:
            for stage in (OVERALL, *self._open):
                self._peaks[stage] = max(self._peaks.get(stage, 0), rss)
        return rss

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Samples taken inside the block count for stage ``name`` (sampled on entry and exit too)."""
        with self._lock:
            self._open.append(name)
        self.sample()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sample()
            with self._lock:
                self._open.remove(name)
                self._seconds[name] = round(self._seconds.get(name, 0.0) + time.perf_counter() - t0, 2)

    def peaks_gib(self) -> dict[str, float]:
        """{stage: peak GiB} in the order the stages began, the whole span last as :data:`OVERALL`."""
        with self._lock:
            peaks = {k: v for k, v in self._peaks.items() if k != OVERALL}
            peaks[OVERALL] = self._peaks.get(OVERALL, 0)
        return {k: round(v / 2**30, 2) for k, v in peaks.items()}

    def seconds(self) -> dict[str, float]:
        """{stage: wall seconds} of the stages that ended, in the order they began."""
        with self._lock:
            return {k: self._seconds[k] for k in self._peaks if k in self._seconds}


def peaks_line(peaks_gib: dict[str, float], interval_s: float = DEFAULT_INTERVAL_S) -> str:
    """One line for a command's output: ``peak RSS (sampled every 0.5 s): export 3.1 GiB, ...``."""
    return (f"peak RSS (sampled every {interval_s:g} s, process + children): "
            + ", ".join(f"{k} {v:.2f} GiB" for k, v in peaks_gib.items()))


class NullMonitor:
    """A monitor that records nothing (for callers that pass none)."""

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        yield
