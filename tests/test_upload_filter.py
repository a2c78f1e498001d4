"""The upload filter (facetron.faces.consistency, used by training.preprocess)
on real photos of different people: a stranger injected among 3-5 photos is
dropped; genuine sets keep every photo.

Users: views of one real photo (the astronaut; each of four people of
insightface's t1.jpg) — crops, mirror, tilt, exposure. Strangers: Tom Hanks
and the other t1 people. With the old mean/std rule no z-score can pass
sqrt(n - 1), so its 2-sigma rule never fired for 5 photos or fewer."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from face_photos import photo
from facetron.faces.alignment import align_faces
from facetron.faces.consistency import DLIB_SAME_PERSON, identity_outliers, leave_one_out_scores
from facetron.faces.crop import square_crop
from facetron.faces.detector import FaceDetector
from facetron.faces.embedder import FaceEmbedder
from facetron.imageio import save_image
from facetron.training.demo_photos import _exposure, _rotate, _zoom


@pytest.fixture(scope="module")
def models():
    return FaceDetector(), FaceEmbedder()


def _descriptor(image: np.ndarray, models) -> np.ndarray:
    det, emb = models
    d = det.detect(image)
    i = int(np.argmax((d.boxes[:, 2] - d.boxes[:, 0]) * (d.boxes[:, 3] - d.boxes[:, 1])))
    return emb.descriptors(align_faces(image, d.landmarks[i : i + 1]))[0]


def _views(image: np.ndarray, centre: tuple[float, float]) -> list[np.ndarray]:
    """Five views of one photo: itself, mirror, close-up, tilted, warmer exposure."""
    cx, cy = centre
    return [image, image[:, ::-1].copy(), _zoom(image, 1.4, cx, cy), _rotate(image, 12, cx, cy),
            _exposure(image, 0.85, (1.08, 1.0, 0.9))]


@pytest.fixture(scope="module")
def people(models) -> dict[str, list[np.ndarray]]:
    """name -> descriptors of its views (users) or of its one photo (strangers)."""
    det = models[0]
    astro = photo("astronaut")
    out = {"astronaut": [_descriptor(v, models) for v in _views(astro, (215.0, 130.0))]}
    t1 = photo("t1")
    boxes = det.detect(t1).boxes
    for k, i in enumerate(np.argsort(boxes[:, 0])):
        crop = square_crop(t1, boxes[i], 320, 2.6)
        out[f"t1_{k}"] = [_descriptor(v, models) for v in _views(crop, (160.0, 160.0))]
    out["tom_hanks"] = [_descriptor(photo("tom_hanks"), models)]
    return out


def _sets(people, user: str):
    """(descriptors, stranger name) for every 2-4 views of ``user`` + one stranger."""
    views = people[user]
    for m in (2, 3, 4):
        for idx in itertools.combinations(range(len(views)), m):
            for stranger, theirs in people.items():
                if stranger != user:
                    yield np.stack([views[i] for i in idx] + [theirs[0]]), stranger


@pytest.mark.parametrize("user", ["astronaut", "t1_1", "t1_2", "t1_4", "t1_5"])
def test_a_stranger_among_3_to_5_photos_is_dropped(people, user) -> None:
    """Every set of 2-4 views + one stranger, except where the embedder itself
    calls the stranger the same person as one of the user's photos (dlib
    distance < 0.6: t1's persons 3 and 4 come as close as 0.56 — no identity
    rule built on this embedder can separate them; measured: 12 of 1225 sets
    over all users, all of them that pair)."""
    checked = 0
    for desc, stranger in _sets(people, user):
        if np.linalg.norm(desc[:-1] - desc[-1], axis=1).min() < DLIB_SAME_PERSON:
            assert {user, stranger} == {"t1_3", "t1_4"}, (user, stranger)
            continue
        res = identity_outliers(desc, descriptors=desc)
        assert not res.keep[-1], (user, stranger, len(desc), res.scores, res.threshold, res.matches)
        assert res.keep[:-1].all(), (user, stranger, len(desc), res.reasons)
        assert res.reasons[-1].startswith("identity:")
        checked += 1
    assert checked > 100


@pytest.mark.parametrize("user", ["astronaut", "t1_1", "t1_4"])
def test_genuine_sets_keep_every_photo(people, user) -> None:
    views = np.stack(people[user])
    for m in (3, 4, 5):
        for idx in itertools.combinations(range(len(views)), m):
            res = identity_outliers(views[list(idx)], descriptors=views[list(idx)])
            assert res.keep.all(), (user, idx, res.reasons)


def test_the_robust_rule_alone_and_the_old_rule(people) -> None:
    """Without descriptors (the median/MAD rule alone) the stranger still goes;
    the old mean/std z-score is bounded by sqrt(n - 1) < 2 for n <= 4."""
    desc = np.stack(people["astronaut"][:3] + people["tom_hanks"])
    res = identity_outliers(desc)
    assert res.keep.tolist() == [True, True, True, False]
    emb = desc / np.linalg.norm(desc, axis=1, keepdims=True)
    sims = emb @ emb.T
    np.fill_diagonal(sims, 0)
    mean_cos = sims.sum(1) / 3
    z = (mean_cos - mean_cos.mean()) / mean_cos.std()
    assert z.min() >= -np.sqrt(3) - 1e-6 > -2.0  # bounded by sqrt(n - 1): the old 2-sigma rule keeps the stranger
    np.testing.assert_allclose(leave_one_out_scores(emb)[-1], float(emb[-1] @ (emb[:3].sum(0) / np.linalg.norm(emb[:3].sum(0)))), atol=1e-6)


def test_small_sets_keep_everything() -> None:
    assert identity_outliers(np.zeros((0, 128), np.float32)).keep.shape == (0,)
    two = np.eye(2, 128, dtype=np.float32)
    assert identity_outliers(two, descriptors=two).keep.all()


def test_prepare_drops_the_stranger_among_four_photos(tmp_path: Path) -> None:
    """End to end: three views of the astronaut + Tom Hanks -> three kept."""
    from facetron.faces.attributes import UserAttributes
    from facetron.training.preprocess import PrepareConfig, prepare_photos

    photos = tmp_path / "photos"
    photos.mkdir()
    for i, view in enumerate(_views(photo("astronaut"), (215.0, 130.0))[:3]):
        save_image(photos / f"me_{i}.png", view)
    save_image(photos / "stranger.png", photo("tom_hanks"))
    res = prepare_photos(photos, tmp_path / "out", PrepareConfig(resolution=128), UserAttributes({}), progress=False)
    fate = {p.file: p for p in res.photos}
    assert [f for f, p in sorted(fate.items()) if p.kept] == ["me_0.png", "me_1.png", "me_2.png"]
    assert fate["stranger.png"].reason.startswith("identity:")
