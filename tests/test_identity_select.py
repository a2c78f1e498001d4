"""Checkpoints chosen by identity (training.identity_select, ``train lora
--select-by-identity N``): the tiny model end to end (its samples hold no
face: the scores are noise, here all 0, and the choice is the tie-break),
the choice itself on real photos, and bad input."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from face_photos import photo, square_crop
from facetron.client.grid import draw_grid
from facetron.faces.alignment import align_faces
from facetron.faces.detector import FaceDetector
from facetron.faces.embedder import FaceEmbedder
from facetron.imageio import load_image
from facetron.pipeline.net_io import pack_detections
from facetron.training.dataset import write_dataset
from facetron.training.demo_photos import _exposure, _rotate, _zoom
from facetron.training.identity_select import (
    CandidateScore,
    IdentitySelection,
    SampleSpec,
    choose,
    select_by_identity,
    write_selection,
)
from facetron.users import UserRegistry

SIZE = 128


@pytest.fixture(scope="module")
def faces():
    det, emb = FaceDetector(), FaceEmbedder()
    return det, emb, (lambda images: pack_detections(det.detect_batch(list(images)))), emb.embed


@pytest.fixture(scope="module")
def astronaut(faces) -> tuple[list[np.ndarray], np.ndarray]:
    """Four 128² views of the astronaut and her reference embedding."""
    det, emb, _, _ = faces
    astro = photo("astronaut")
    views = [astro, astro[:, ::-1].copy(), _zoom(astro, 1.3, 215, 150), _exposure(astro, 0.85, (1.08, 1.0, 0.9)),
             _rotate(astro, 10, 215, 130)]
    crops = [square_crop(v, det.detect(v).boxes[0], 0.7, SIZE) for v in views]
    lm = det.detect(crops[0]).landmarks[:1]
    return crops, emb.embed(align_faces(crops[0], lm))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, astronaut) -> Path:
    crops, _ = astronaut
    root = tmp_path_factory.mktemp("select") / "dataset"
    return write_dataset(root, crops[:4], ["a photo of <facetron-user>, a woman"] * 4)


def _train_parser():
    from facetron.cli import train as train_cmd

    parser = argparse.ArgumentParser(prog="facetron")
    train_cmd.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_select_by_identity_installs_the_argmax_of_the_recorded_scores(dataset, astronaut, tmp_path, capsys) -> None:
    _, reference = astronaut
    ref_file = tmp_path / "reference.npy"
    np.save(ref_file, reference)
    out, users = tmp_path / "loras", tmp_path / "users"
    args = _train_parser().parse_args([
        "train", "lora", str(dataset), "--user", "astro", "--train-steps", "6", "--lr", "5e-3", "--out", str(out),
        "--users-dir", str(users), "--reference-embedding", str(ref_file), "--select-by-identity", "3",
        "--no-progress"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / "identity_selection.json").read_text())
    rows = doc["candidates"]
    assert [r["step"] for r in rows] == [2, 4, 6] and all(r["samples"] == 4 for r in rows)
    assert doc["smoke_model"] is True and "noise" in doc["note"] and "noise" in printed
    recorded = [CandidateScore(**r) for r in rows]
    best = rows[choose(recorded)]
    assert doc["selected"]["step"] == best["step"]
    assert max(r["score"] for r in rows) == best["score"]
    chosen = Path(best["lora"]).read_bytes()
    assert (out / "astro.safetensors").read_bytes() == chosen
    assert UserRegistry(users).lora_path("astro").read_bytes() == chosen
    sidecar = json.loads((out / "astro.json").read_text())
    assert sidecar["selected_by_identity"]["selected"]["step"] == best["step"]
    assert len(sidecar["selected_by_identity"]["table"]) == 3
    sheet = load_image(out / "identity_selection.png")
    assert sheet.shape[0] > 3 * SIZE  # one row of samples per candidate
    md = (out / "identity_selection.md").read_text()
    assert "| 6 |" in md and "**yes**" in md
    # the three candidates really differ (LoRAs at different steps)
    files = sorted((out / "astro.candidates").glob("step-*.safetensors"))
    assert len(files) == 3 and len({f.read_bytes() for f in files}) == 3


def test_the_best_identity_wins_on_real_photos(faces, astronaut, tmp_path) -> None:
    """Renders replaced by real photos: candidate 1 'renders' strangers,
    candidate 2 the user, candidate 3 noise. Candidate 2 wins; the table's
    numbers are the embedder's."""
    det, _, detect, embed = faces
    crops, reference = astronaut
    t1 = photo("t1")
    strangers = [square_crop(t1, b, 0.7, SIZE) for b in det.detect(t1).boxes[:4]]
    noise = np.random.default_rng(0).integers(0, 255, (4, SIZE, SIZE, 3), dtype=np.uint8)
    renders = {"a": np.stack(strangers), "b": np.stack(crops[1:5]), "c": noise}
    candidates = [(10, tmp_path / "a"), (20, tmp_path / "b"), (30, tmp_path / "c")]
    sel = select_by_identity(candidates, reference, lambda p: renders[p.name], detect, embed, SampleSpec())
    a, b, c = sel.rows
    assert sel.best == 1 and sel.best_row.step == 20
    assert b.share_one_face == 1.0 and b.mean_similarity > 0.95
    assert a.one_face >= 3 and a.mean_similarity < 0.9 and c.one_face == 0 and c.score == 0.0
    assert b.score == pytest.approx(b.share_one_face * b.mean_similarity, abs=1e-4)
    paths = write_selection(sel, tmp_path, draw_grid)
    assert json.loads(paths["json"].read_text())["selected"]["step"] == 20
    assert load_image(paths["contact_sheet"]).shape[2] == 3


def test_ties_go_to_the_later_step() -> None:
    rows = [CandidateScore(step=s, lora=str(s), samples=2, one_face=0, share_one_face=0.0, mean_similarity=None,
                           score=0.0) for s in (5, 10, 15)]
    assert choose(rows) == 2
    rows[0].score = 0.1
    assert choose(rows) == 0
    sel = IdentitySelection(rows, choose(rows), SampleSpec(), smoke_model=False)
    assert sel.as_dict()["selected"]["step"] == 5


@pytest.mark.parametrize("count, message", [
    ("0", "--select-by-identity: must be a number of checkpoints >= 1, got 0"),
    ("-2", "--select-by-identity: must be a number of checkpoints >= 1, got -2"),
    ("4", "--select-by-identity: 4 candidates need at least 4 training steps, got 3"),
])
def test_bad_counts_are_named_and_nothing_is_written(dataset, astronaut, tmp_path, capsys, count, message) -> None:
    from facetron import cli

    ref_file = tmp_path / "reference.npy"
    np.save(ref_file, astronaut[1])
    out = tmp_path / "loras"
    code = cli.main(["train", "lora", str(dataset), "--user", "astro", "--train-steps", "3", "--out", str(out),
                     "--users-dir", str(tmp_path / "users"), "--reference-embedding", str(ref_file),
                     "--select-by-identity", count, "--no-progress"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"facetron train: error: {message}"
    assert not out.exists() and not (tmp_path / "users").exists()


def test_selection_needs_a_reference(dataset, tmp_path, capsys) -> None:
    from facetron import cli

    code = cli.main(["train", "lora", str(dataset), "--user", "nobody", "--train-steps", "3", "--out", str(tmp_path / "l"),
                     "--users-dir", str(tmp_path / "users"), "--select-by-identity", "2", "--no-progress"])
    assert code == 2
    assert "--select-by-identity: needs the user's reference embedding" in capsys.readouterr().err
    assert not (tmp_path / "l").exists()
