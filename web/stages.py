"""The training stages the web app runs, as subprocesses of the ``facetron`` CLI.

Preparing photos and training a LoRA are not served over gRPC: they run
``facetron train prepare`` / ``facetron train lora`` in a child process, so
no model code (torch, diffusers, the face models) is ever loaded into the
web process. The child's progress bars (tqdm on stderr: ``desc: 45%|...|
9/20 [...]``) are parsed as they arrive and reported as ``(done, total,
label)``; the child's one-line error (``facetron train: error: ...``) becomes
a :class:`StageError` with that text.

Each child runs in its own session (its own process group, so the tools it
starts go with it) and is tracked while it runs: it is stopped (SIGTERM to
the group, SIGKILL after a grace period) when the caller cancels it (the
page's client went away), when it runs past its timeout, and, through
:func:`stop_all`, when the app closes. No stage outlives the app.
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from facetron.contract import PARENT_PID_ENV
from facetron.errors import FacetronError

StageProgress = Callable[[int, int, str], None]  # (done, total, label)

# tqdm's default bar: "<desc>: <pct>%|<bar>| <n>/<total> [<elapsed><<remaining>, <rate>]"
_TQDM = re.compile(r"(?:(?P<desc>[^\r\n|:]*):\s*)?\s*(?P<pct>\d+)%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)")
_ERROR = re.compile(r"^facetron [\w ]+: error: (?P<message>.+)$")
_TAIL_LINES = 40
STOP_GRACE_S = 5.0  # seconds between SIGTERM and SIGKILL when a stage is stopped

_live: set[subprocess.Popen] = set()
_live_lock = threading.Lock()


class StageError(FacetronError):
    """A training stage failed; the message is the CLI's own one-line reason."""


@dataclass(frozen=True)
class ProgressLine:
    done: int
    total: int
    label: str


def parse_progress(text: str) -> Optional[ProgressLine]:
    """The last tqdm state in ``text`` (one or more ``\\r``-separated updates), or None."""
    found = None
    for m in _TQDM.finditer(text):
        found = m
    if found is None:
        return None
    return ProgressLine(int(found["n"]), int(found["total"]), (found["desc"] or "").strip())


def cli_error(lines: Sequence[str]) -> Optional[str]:
    """The CLI's own error line (``facetron <command>: error: <reason>``), if any."""
    for line in reversed(lines):
        m = _ERROR.match(line.strip())
        if m:
            return m["message"]
    return None


@dataclass
class StageResult:
    """What a finished stage printed (stdout lines, the tail of stderr) and how long it took."""

    command: list[str]
    stdout: list[str]
    stderr_tail: list[str]
    seconds: float
    last_progress: Optional[ProgressLine] = None
    updates: int = field(default=0)


def cli_command(args: Sequence[str]) -> list[str]:
    """``facetron ARGS`` run with this interpreter (``python -m facetron.cli``)."""
    return [sys.executable, "-m", "facetron.cli", *map(str, args)]


def _pump(stream, on_chunk: Callable[[str], None]) -> None:
    """Read a text stream in small pieces (tqdm ends its updates with ``\\r``, not ``\\n``)."""
    while True:
        chunk = stream.read1(4096) if hasattr(stream, "read1") else stream.read(4096)
        if not chunk:
            return
        on_chunk(chunk.decode("utf-8", "replace") if isinstance(chunk, bytes) else chunk)


def stop_process(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """End a stage's whole process group: SIGTERM, then SIGKILL after ``grace_s``; reap it."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)  # the child leads its own group (start_new_session)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    try:  # the leader is gone: what it left in its group goes too
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.poll()


def live_stages() -> list[int]:
    """Process ids of the stages running now."""
    with _live_lock:
        return sorted(p.pid for p in _live if p.poll() is None)


def stop_all(grace_s: float = STOP_GRACE_S) -> int:
    """Stop every running stage (the app is closing); returns how many were running."""
    with _live_lock:
        procs = [p for p in _live if p.poll() is None]
    for proc in procs:
        stop_process(proc, grace_s)
    return len(procs)


atexit.register(stop_all)  # also when the app's process ends without closing the page


def run_stage(args: Sequence[str], on_progress: Optional[StageProgress] = None, *, timeout_s: float = 3600.0,
              env: Optional[dict[str, str]] = None, cwd: Optional[Path] = None,
              cancel: Optional[threading.Event] = None) -> StageResult:
    """Run ``facetron ARGS`` to the end, reporting its progress bars; raise
    :class:`StageError` (the CLI's reason) when it fails, runs past ``timeout_s``
    or ``cancel`` is set (the child's process group is stopped then)."""
    command = cli_command(args)
    child_env = {**os.environ, **(env or {})}
    child_env.setdefault("TQDM_MININTERVAL", "0.2")  # a few updates per second are plenty
    child_env["PYTHONUNBUFFERED"] = "1"
    child_env[PARENT_PID_ENV] = str(os.getpid())  # the stage ends with the app, even a SIGKILLed one
    t0 = time.perf_counter()
    with _live_lock:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                env=child_env, cwd=cwd, start_new_session=True)
        _live.add(proc)
    stdout_parts: list[str] = []
    err_lines: list[str] = []
    pending = {"text": ""}
    state: dict = {"last": None, "updates": 0}
    lock = threading.Lock()

    def on_err(chunk: str) -> None:
        with lock:
            text = pending["text"] + chunk
            pieces = re.split(r"[\r\n]", text)
            pending["text"] = pieces.pop()  # an unfinished piece waits for its end
            for piece in pieces:
                if not piece.strip():
                    continue
                line = parse_progress(piece)
                if line is not None:
                    state["last"], state["updates"] = line, state["updates"] + 1
                    if on_progress is not None:
                        on_progress(line.done, line.total, line.label)
                else:
                    err_lines.append(piece)
                    del err_lines[:-_TAIL_LINES]

    readers = [threading.Thread(target=_pump, args=(proc.stdout, stdout_parts.append), daemon=True),
               threading.Thread(target=_pump, args=(proc.stderr, on_err), daemon=True)]
    for r in readers:
        r.start()
    what = f"`facetron {' '.join(map(str, args[:2]))}`"
    deadline = time.monotonic() + timeout_s
    try:
        while proc.poll() is None:
            if cancel is not None and cancel.is_set():
                stop_process(proc)
                raise StageError(f"{what} was stopped (the page that started it went away, or the app closed)")
            if time.monotonic() > deadline:
                stop_process(proc)
                raise StageError(f"{what} ran past {timeout_s:g} s and was stopped")
            try:
                proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
    except BaseException:
        stop_process(proc)  # an error here (KeyboardInterrupt too) never leaves the child running
        raise
    finally:
        with _live_lock:
            _live.discard(proc)
        for r in readers:
            r.join(timeout=5)
    if pending["text"].strip():
        err_lines.append(pending["text"])
    stdout = "".join(stdout_parts).splitlines()
    result = StageResult(command, stdout, err_lines, time.perf_counter() - t0, state["last"], state["updates"])
    if proc.returncode != 0:
        reason = cli_error(err_lines) or (err_lines[-1].strip() if err_lines else f"exit code {proc.returncode}")
        raise StageError(reason)
    return result


# --- the two stages -------------------------------------------------------------------


def prepare_args(photos: Path, user_id: str, out: Path, users_dir: Optional[Path], base_model: Optional[Path],
                 attrs: Sequence[str] = (), min_photos: Optional[int] = None) -> list[str]:
    args = ["train", "prepare", str(photos), "--user", user_id, "--out", str(out), "--progress", "bars"]
    if users_dir is not None:
        args += ["--users-dir", str(users_dir)]
    if base_model is not None:
        args += ["--base-model", str(base_model)]
    for a in attrs:
        args += ["--attr", a]
    if min_photos is not None:
        args += ["--min-photos", str(min_photos)]
    return args


def lora_args(dataset: Path, user_id: str, out: Path, users_dir: Optional[Path], base_model: Optional[Path],
              steps: Optional[int], reference_embedding: Optional[Path] = None) -> list[str]:
    args = ["train", "lora", str(dataset), "--user", user_id, "--out", str(out), "--progress", "bars"]
    if users_dir is not None:
        args += ["--users-dir", str(users_dir)]
    if base_model is not None:
        args += ["--base-model", str(base_model)]
    if steps is not None:
        args += ["--train-steps", str(int(steps))]
    if reference_embedding is not None and reference_embedding.is_file():
        args += ["--reference-embedding", str(reference_embedding)]
    return args
