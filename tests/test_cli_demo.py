"""The README's main-job command runs end to end (small settings) and writes
its portraits, grid and report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.triton


def test_demo_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "facetron.cli", "demo", "--out", str(out), "--build", str(tmp_path / "build"),
         "--train-steps", "20", "--templates", "1", "--num-images", "2", "--top-k", "1", "--steps", "4",
         "--size", "128"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report["prepare"]["dropped"]) == {"group_t1.jpg", "no_face_coffee.png", "stranger_tom_hanks.png"}
    assert report["train"]["steps"] == 20
    assert report["smoke_model"] is True and "not portraits" in report["note"]
    call = report["portraits"][0]
    assert call["server"]["mode"] == "template" and call["server"]["fusion"]["fused"] == [True, True]
    assert call["server"]["fusion"]["strength"] == 1.0  # the demo's strength on the tiny model
    # the tiny model makes no face: nothing generated to rank; each fused picture is detected again and scored
    # where its face is found, or says why not (never a score for a picture without a face)
    assert call["similarity_generated"] == [None, None] and call["ranked_by"] in ("final", "generated")
    for final, why in zip(call["similarity_final"], call["server"]["final_unscored"]):
        assert (final is None) == (why is not None), (final, why)
    scored = [s for s in call["similarity_final"] if s is not None]
    assert len(call["selected"]) == min(1, len(scored))
    assert {"prepare", "train_lora", "export_repository", "start_triton", "portraits_grpc", "total"} <= set(
        report["timings_s"]
    )
    assert (out / "grid.png").is_file() == bool(call["selected"]) and (out / "contact_sheet.png").is_file()
    assert len(list((out / "portraits").glob("*.png"))) == len(call["selected"])
    assert not list(out.rglob(".*.tmp")), "temp files left behind"
