"""Quality gate, identity consistency, attributes interface, classical retouch
(face fusion: tests/test_fusion.py; the upload filter on real photos: tests/test_upload_filter.py)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from facetron.errors import InvalidInputError, NotFoundError
from facetron.faces.alignment_math import similarity_transform
from facetron.faces.attributes import (
    FairFaceAttributes,
    FairFaceResNet34,
    UserAttributes,
    decode_logits,
    parse_attr_flags,
    preprocess_faces,
)
from facetron.faces.consistency import dominant_face, identity_outliers, reference_embedding
from facetron.faces.quality import QualityThresholds, face_quality
from facetron.faces.retouch import face_ellipse_mask, smooth_skin, white_background

LM = np.array([[40, 50], [80, 50], [60, 72], [45, 92], [75, 92]], np.float32)  # a 128x128 face


def _textured(seed: int = 0, size: int = 128) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(30, 220, (size // 8, size // 8, 3), dtype=np.uint8)
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_NEAREST)


def test_quality_flags_blur_and_size() -> None:
    sharp = _textured()
    q = face_quality(sharp, np.array([0, 0, 128, 128]), 0.99)
    assert q.failures() == []
    blurry = cv2.GaussianBlur(sharp, (31, 31), 10)
    qb = face_quality(blurry, np.array([0, 0, 128, 128]), 0.99)
    assert qb.sharpness < q.sharpness / 10 and any("blurry" in f for f in qb.failures())
    small = face_quality(sharp, np.array([0, 0, 30, 30]), 0.5)
    fails = " ".join(small.failures(QualityThresholds()))
    assert "face 30 px < 64 px" in fails and "detector score 0.50" in fails


def test_quality_exposure() -> None:
    dark = (_textured() // 8).astype(np.uint8)
    assert any("too dark" in f for f in face_quality(dark, np.array([0, 0, 128, 128]), 1.0).failures())


def test_identity_outlier_is_dropped() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(size=128)
    same = base + 0.3 * rng.normal(size=(6, 128))
    stranger = rng.normal(size=(1, 128))
    emb = np.vstack([same, stranger]).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    res = identity_outliers(emb, k=1.5)
    assert res.keep[:6].all() and not res.keep[6]
    ref = reference_embedding(emb[res.keep])
    assert ref.shape == (1, 128) and abs(np.linalg.norm(ref) - 1) < 1e-5


def test_identity_small_sets() -> None:
    assert identity_outliers(np.zeros((0, 128), np.float32)).keep.shape == (0,)
    assert identity_outliers(np.eye(2, 128, dtype=np.float32)).keep.all()


def test_dominant_face_rule() -> None:
    assert dominant_face(np.zeros((0, 4))) is None
    assert dominant_face(np.array([[0, 0, 10, 10]])) == 0
    assert dominant_face(np.array([[0, 0, 10, 10], [0, 0, 30, 30]])) == 1  # 9x area
    assert dominant_face(np.array([[0, 0, 20, 20], [0, 0, 30, 30]])) is None  # 2.25x


def test_user_attributes() -> None:
    values = parse_attr_flags(["gender=woman", "age=30s"])
    assert UserAttributes(values).predict([np.zeros((4, 4, 3), np.uint8)]) == [
        {"gender": "woman", "age": "30s", "source": "user"}
    ]
    with pytest.raises(InvalidInputError, match="expected key=value"):
        parse_attr_flags(["gender"])
    with pytest.raises(InvalidInputError):
        parse_attr_flags(["../x=1"])


def test_fairface_head_loads_torchvision_layout(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = FairFaceResNet34().eval()
    state = {f"module.{k}": v for k, v in model.state_dict().items()}  # DataParallel-style keys
    weights = tmp_path / "res34_fair_align_multi_7.pt"
    torch.save(state, weights)
    provider = FairFaceAttributes(weights)
    faces = [_textured(i, 96) for i in range(3)]
    preds = provider.predict(faces)
    assert len(preds) == 3 and all(p["source"] == "fairface" and p["gender"] in ("man", "woman") for p in preds)
    with torch.no_grad():  # the DataParallel keys loaded into the same weights
        ref = model(torch.from_numpy(preprocess_faces(faces))).numpy()
    assert np.abs(provider.model(torch.from_numpy(preprocess_faces(faces))).detach().numpy() - ref).max() < 1e-6
    assert preds == decode_logits(ref)


def test_fairface_bad_weights(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        FairFaceAttributes(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"fc.weight": torch.zeros(18, 512), "something": torch.zeros(1)}, bad)
    with pytest.raises(InvalidInputError, match="not a FairFace ResNet34 state dict"):
        FairFaceAttributes(bad)


def test_similarity_transform_recovers_known_transform() -> None:
    angle, scale, t = np.radians(20), 1.7, np.array([5.0, -3.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = LM @ rot.T + t
    m = similarity_transform(LM, dst)
    np.testing.assert_allclose(m[:, :2], rot, atol=1e-9)
    np.testing.assert_allclose(m[:, 2], t, atol=1e-9)


def test_smooth_skin_changes_only_the_face() -> None:
    rng = np.random.default_rng(3)
    img = np.clip(150 + rng.normal(0, 8, (128, 128, 3)), 0, 255).astype(np.uint8)  # noisy "skin"
    out = smooth_skin(img, LM, strength=1.0)
    mask = face_ellipse_mask(img.shape, LM)
    far = cv2.dilate(mask, np.ones((25, 25), np.uint8)) == 0
    assert np.array_equal(out[far], img[far])
    assert np.abs(out[mask > 0].astype(int) - img[mask > 0]).mean() > 2


def test_white_background() -> None:
    img = _textured(4, 256)
    out = white_background(img, LM + 64)
    assert (out[-5:, :5] == 255).all() and (out[:5, -5:] == 255).all()
    assert np.array_equal(out[140, 124], img[140, 124])  # face centre kept
