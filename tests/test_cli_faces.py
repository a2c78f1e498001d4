"""`facetron faces detect|embed|compare|select` on real photos and bad files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from face_photos import photo
from facetron.imageio import save_image

FACETRON = [sys.executable, "-m", "facetron.cli", "faces"]


def _run(*args: str) -> tuple[int, dict | None, str]:
    proc = subprocess.run(FACETRON + list(args), capture_output=True, text=True, timeout=300)
    doc = json.loads(proc.stdout) if proc.stdout.strip() else None
    return proc.returncode, doc, proc.stderr


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("photos")
    save_image(d / "t1.png", photo("t1"))
    tom = photo("tom_hanks")
    save_image(d / "tom.png", tom)
    save_image(d / "tom_flipped_big.png", cv2.resize(tom[:, ::-1].copy(), (224, 224)))
    save_image(d / "gray.png", np.full((200, 200, 3), 128, np.uint8))
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    return d


def test_detect_folder_reports_each_file(photos: Path, tmp_path: Path) -> None:
    code, doc, _ = _run("detect", str(photos), "--out", str(tmp_path))
    assert code == 1  # the corrupt file
    by_name = {Path(r["file"]).name: r for r in doc["results"]}
    assert by_name["t1.png"]["num_faces"] == 6
    assert by_name["tom.png"]["num_faces"] == 1
    assert by_name["gray.png"]["num_faces"] == 0  # explicit empty result
    assert "is not a readable image" in by_name["corrupt.jpg"]["error"]
    assert (tmp_path / "t1.detect.png").is_file()
    q = by_name["tom.png"]["faces"][0]["quality"]
    assert {"sharpness", "brightness", "face_px", "score"} <= set(q)


def test_embed_and_compare(photos: Path) -> None:
    code, doc, _ = _run("embed", str(photos / "tom.png"), str(photos / "t1.png"))
    assert code == 1
    ok, bad = doc["results"]
    assert abs(np.linalg.norm(ok["embedding"]) - 1) < 1e-3
    assert "6 faces and none clearly dominant" in bad["error"]
    code, doc, _ = _run("compare", str(photos / "tom.png"), str(photos / "tom_flipped_big.png"))
    assert code == 0 and doc["dlib_same_person"] and doc["dlib_distance"] < 0.6


def test_compare_no_face_is_one_clear_line(photos: Path) -> None:
    code, doc, err = _run("compare", str(photos / "tom.png"), str(photos / "gray.png"))
    assert code == 2 and doc is None
    assert err.strip() == f"facetron faces: error: {photos / 'gray.png'}: no face found"


def test_select_in_process(photos: Path, tmp_path: Path) -> None:
    cands = tmp_path / "cands"
    cands.mkdir()
    t1 = photo("t1")
    save_image(cands / "a_other.png", t1[40:300, 250:420])
    save_image(cands / "b_tom.png", photo("tom_hanks"))
    save_image(cands / "c_none.png", np.full((64, 64, 3), 90, np.uint8))
    code, doc, err = _run("select", str(cands), "--reference", str(photos / "tom_flipped_big.png"), "--top-k", "1")
    assert code == 0, err
    assert [Path(p).name for p in doc["selected"]] == ["b_tom.png"]
    none = [c for c in doc["candidates"] if c["file"].endswith("c_none.png")][0]
    assert none["rank"] == -1 and none["similarity"] is None and "0 faces" in none["filtered"]


@pytest.mark.triton
def test_select_over_grpc(photos: Path, tmp_path: Path, triton) -> None:
    cands = tmp_path / "cands"
    cands.mkdir()
    save_image(cands / "a_other.png", photo("t1")[40:300, 250:420])
    save_image(cands / "b_tom.png", photo("tom_hanks"))
    code, doc, err = _run(
        "select", str(cands), "--reference", str(photos / "tom.png"), "--server", triton.grpc_url, "--top-k", "1"
    )
    assert code == 0, err
    assert doc["via"].startswith("triton") and [Path(p).name for p in doc["selected"]] == ["b_tom.png"]
