"""A training stage the web app started ends when the app dies, even by SIGKILL (issue 21:
no orphaned training processes). The "app" here is a real process running
web.stages.run_stage in a worker thread, as the web app does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from facetron.contract import PARENT_PID_ENV

APP = textwrap.dedent("""
    import sys, threading, time
    from facetron.web import stages
    # the stage: what `python -m facetron.cli` does first (end_with_parent), then a long wait
    stages.cli_command = lambda args: [sys.executable, "-c", "from facetron.cli.conventions import end_with_parent; "
                                       "end_with_parent(); import time; time.sleep(120)"]
    threading.Thread(target=stages.run_stage, args=([],), kwargs={"timeout_s": 120}, daemon=True).start()
    while not stages.live_stages():
        time.sleep(0.05)
    print(stages.live_stages()[0], flush=True)
    time.sleep(120)
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:  # a zombie (exited, not yet reaped by init) is gone too
        return fh.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_stage_ends_when_the_app_is_sigkilled() -> None:
    app = subprocess.Popen([sys.executable, "-c", APP], stdout=subprocess.PIPE, text=True)
    try:
        stage = int(app.stdout.readline())
        assert _alive(stage)
        app.send_signal(signal.SIGKILL)
        app.wait(10)
        deadline = time.monotonic() + 10
        while _alive(stage) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(stage), "the stage outlived the SIGKILLed app"
    finally:
        app.kill()


def test_the_cli_arms_it_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """facetron's entry point arms the parent-death signal before anything else; a command whose
    parent is already gone ends at once."""
    import importlib

    cli_main = importlib.import_module("facetron.cli.main")  # the module (facetron.cli.main is also the function)
    calls = []
    monkeypatch.setattr(cli_main, "end_with_parent", lambda: calls.append(1))
    assert cli_main.main(["--progress", "off", "assets"]) == 0 and calls == [1]
    gone = subprocess.run([sys.executable, "-m", "facetron.cli", "--version"], capture_output=True, text=True,
                          env={**os.environ, PARENT_PID_ENV: "1"})  # pid 1 is not our parent
    assert gone.returncode != 0 and "is gone" in gone.stderr
