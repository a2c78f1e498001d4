"""Progress output, one rule for every bar facetron draws.

* ``bars``  — tqdm bars on stderr (what a terminal wants; ``facetron web``
  asks its ``facetron train`` children for them and parses them);
* ``lines`` — one line on stderr per stage when it ends (``desc: n/total
  unit in s``): what a log file wants;
* ``off``   — nothing (``facetron -q``);
* ``auto``  — ``bars`` when stderr is a terminal, else ``lines`` (default).

The CLI sets the mode once per command (``--progress``, ``-q``); library
callers get ``auto``. Bars are made only through :func:`progress_bar`; the
model-loading bars of huggingface_hub / transformers / diffusers follow the
mode through their own switch (:data:`LIBRARY_BARS_ENV`, read when they are
imported, which the CLI does after setting the mode).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable, Iterator

PROGRESS_MODES = ("auto", "bars", "lines", "off")
DEFAULT_PROGRESS = "auto"
#: huggingface_hub's switch, which transformers and diffusers follow too
LIBRARY_BARS_ENV = "HF_HUB_DISABLE_PROGRESS_BARS"

_mode = DEFAULT_PROGRESS


def set_mode(value: str) -> None:
    """Set the progress mode for this process (one of :data:`PROGRESS_MODES`)."""
    global _mode
    if value not in PROGRESS_MODES:
        raise ValueError(f"progress mode must be one of {', '.join(PROGRESS_MODES)}, got {value!r}")
    _mode = value
    if mode() != "bars":
        os.environ.setdefault(LIBRARY_BARS_ENV, "1")  # an explicit setting of the user's stays


def mode() -> str:
    """The mode in force, ``auto`` resolved against stderr now: ``bars``, ``lines`` or ``off``."""
    if _mode != "auto":
        return _mode
    isatty = getattr(sys.stderr, "isatty", None)
    return "bars" if isatty is not None and isatty() else "lines"


class StageLine:
    """Stands in for a tqdm bar off a terminal: counts like one (``update``, iteration, ``n``/``total``,
    ``set_postfix``) and writes a single line when the stage ends; with ``silent`` it writes nothing."""

    def __init__(self, iterable: Iterable | None = None, *, desc: str = "", total: float | None = None,
                 unit: str = "it", initial: int = 0, silent: bool = False, **_ignored: Any) -> None:
        self.iterable = iterable
        self.desc = desc
        self.unit = unit
        self.n = initial
        self._initial = initial
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total = total
        self.postfix: dict[str, Any] = {}
        self.silent = silent
        self._t0 = time.perf_counter()
        self._closed = False

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable or ():
                yield item
                self.n += 1
        finally:
            self.close()

    def __enter__(self) -> "StageLine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def refresh(self) -> None:
        """Nothing to redraw: the line is written when the stage ends."""

    def line(self) -> str:
        count = f"{self.n}/{self.total:g}" if self.total else f"{self.n}"
        text = f"{self.desc or 'progress'}: {count} {self.unit} in {time.perf_counter() - self._t0:.1f} s"
        if self.postfix:
            text += " (" + ", ".join(f"{k}={v}" for k, v in self.postfix.items()) + ")"
        return text

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.silent and (self.n > self._initial or self.total):
            print(self.line(), file=sys.stderr, flush=True)


def progress_bar(iterable: Iterable | None = None, *, desc: str, total: float | None = None, unit: str = "it",
                 enabled: bool = True, **tqdm_kwargs: Any):
    """A progress bar after the mode in force: a tqdm bar, a :class:`StageLine`, or a silent one
    (also when ``enabled`` is false). Same interface for the caller in every case."""
    how = mode() if enabled else "off"
    if how == "bars":
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, unit=unit, **tqdm_kwargs)
    return StageLine(iterable, desc=desc, total=total, unit=unit, silent=how == "off", **tqdm_kwargs)
