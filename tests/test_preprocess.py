"""FaceChain's data processing on real photos: each rule, the outputs, the errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from face_photos import photo
from facetron.errors import InvalidInputError
from facetron.faces.attributes import UserAttributes
from facetron.faces.detector import FaceDetector
from facetron.imageio import save_image
from facetron.training.demo_photos import make_demo_photos
from facetron.training.preprocess import (
    PrepareConfig,
    TooFewPhotosError,
    caption_for,
    prepare_photos,
    rotate_upright,
)

CONFIG = PrepareConfig(resolution=128)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("prep")
    photos = make_demo_photos(root / "photos")
    result = prepare_photos(photos, root / "out", CONFIG, UserAttributes({"gender": "woman"}), progress=False)
    return root / "out", result


def test_demo_set_keeps_the_user_and_drops_the_rest(demo) -> None:
    out, result = demo
    by_file = {p.file: p for p in result.photos}
    assert sorted(f for f, p in by_file.items() if p.kept) == sorted(f for f in by_file if f.startswith("astronaut"))
    assert "no face found" in by_file["no_face_coffee.png"].reason
    assert "6 faces and the largest is not 4x the second" in by_file["group_t1.jpg"].reason
    assert by_file["stranger_tom_hanks.png"].reason.startswith("identity:")


def test_outputs_are_complete(demo) -> None:
    out, result = demo
    rows = [json.loads(line) for line in (out / "dataset" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(r["text"] == "a photo of <facetron-user>, a beautiful woman" for r in rows)
    for r in rows:
        assert (out / "dataset" / r["file_name"]).is_file()
    ref = np.load(out / "reference_embedding.npy")
    assert ref.shape == (1, 128) and abs(np.linalg.norm(ref) - 1) < 1e-5
    report = json.loads((out / "report.json").read_text())
    assert report["kept"] == 6 and report["dropped"] == 3 and report["attributes_source"] == "UserAttributes"
    assert (out / "contact_sheet.png").is_file() and (out / "template.png").is_file()
    tmpl = json.loads((out / "template.json").read_text())
    assert np.asarray(tmpl["landmarks"]).shape == (5, 2)
    assert not list(out.parent.glob(".*.tmp"))


def test_reference_embedding_is_the_users_identity(demo) -> None:
    from facetron.faces.alignment import align_faces
    from facetron.faces.embedder import FaceEmbedder

    _, result = demo
    det = FaceDetector()
    emb = FaceEmbedder()
    astro, tom = photo("astronaut"), photo("tom_hanks")
    a = emb.embed(align_faces(astro, det.detect(astro).landmarks[:1]))
    t = emb.embed(align_faces(tom, det.detect(tom).landmarks[:1]))
    ref = result.reference_embedding
    assert float((a @ ref.T)[0, 0]) > 0.97 > float((t @ ref.T)[0, 0])


def test_too_few_photos_lists_every_photo(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    save_image(photos / "group.png", photo("t1"))
    save_image(photos / "one.png", photo("tom_hanks"))
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(TooFewPhotosError) as info:
        prepare_photos(photos, tmp_path / "out", CONFIG, progress=False)
    msg = str(info.value)
    assert "1 usable photo(s), at least 3 needed" in msg
    assert "broken.jpg: unreadable" in msg and "group.png: 6 faces" in msg and "one.png: kept" in msg
    assert not (tmp_path / "out").exists(), "nothing may be written when preparation fails"


def test_empty_and_missing_folders(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match="is empty"):
        prepare_photos(tmp_path / "empty", tmp_path / "out", CONFIG, progress=False)
    with pytest.raises(InvalidInputError, match="is not a folder"):
        prepare_photos(tmp_path / "nope", tmp_path / "out", CONFIG, progress=False)


def test_rotate_upright_levels_the_eyes() -> None:
    import cv2

    tom = cv2.resize(photo("tom_hanks"), (336, 336))
    tom = np.pad(tom, ((80, 80), (80, 80), (0, 0)), mode="edge")
    m = cv2.getRotationMatrix2D((248, 248), 25, 1.0)
    tilted = cv2.warpAffine(tom, m, tom.shape[1::-1], borderMode=cv2.BORDER_REPLICATE)
    det = FaceDetector()
    lm = det.detect(tilted).landmarks[0]
    upright, roll = rotate_upright(tilted, lm)
    assert abs(abs(roll) - 25) < 6
    from facetron.faces.alignment import roll_angle

    assert abs(roll_angle(det.detect(upright).landmarks[0])) < 4


def test_caption_for() -> None:
    assert caption_for({}, "<tok>") == "a photo of <tok>, a person"
    assert caption_for({"gender": "man", "age": "30s"}, "<tok>") == "a photo of <tok>, a handsome man, in their 30s"
    assert caption_for({"gender": "woman", "age": "20-29", "source": "fairface"}, "<t>") == (
        "a photo of <t>, a beautiful woman, 20-29 years old"
    )


def test_cli_prepare_registers_the_user(demo, tmp_path: Path) -> None:
    import subprocess
    import sys

    photos = make_demo_photos(tmp_path / "photos")
    users = tmp_path / "users"
    proc = subprocess.run(
        [sys.executable, "-m", "facetron.cli", "train", "prepare", str(photos), "--user", "astro-1",
         "--out", str(tmp_path / "out"), "--users-dir", str(users), "--attr", "gender=woman", "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "prepared 6/9 photos of 'astro-1' at 128px" in proc.stdout
    from facetron.users import UserRegistry

    assert UserRegistry(users).reference_embedding("astro-1").shape == (1, 128)
    assert UserRegistry(users).template("astro-1") is not None
    bad = subprocess.run(
        [sys.executable, "-m", "facetron.cli", "train", "prepare", str(photos), "--user", "../x"],
        capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 2 and "not a valid user id" in bad.stderr
