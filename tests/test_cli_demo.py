"""The README's main-job command runs end to end and writes its report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.triton


def test_demo_writes_report(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "facetron.cli", "demo", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["input_ids"][0] == 49406 and report["input_ids"][-1] == 49407
    assert {"start_triton", "tokenize_grpc", "total"} <= set(report["timings_s"])
    assert not list(out.glob(".*.tmp")), "temp files left behind"
