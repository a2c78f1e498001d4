"""face_detector, face_embedder and face_select served by a real
tritonserver, over gRPC, on real photos."""

from __future__ import annotations

import numpy as np
import pytest

from face_photos import photo, square_crop
from facetron.errors import InvalidInputError, NotFoundError
from facetron.faces.alignment import align_faces
from facetron.faces.detector import FaceDetector
from facetron.faces.embedder import FaceEmbedder
from facetron.pipeline.net_io import pack_detections
from facetron.pipeline.selection import select_portraits
from facetron.users import UserRegistry
from user_tokens import grant  # noqa: E402

pytestmark = pytest.mark.triton

DET_OUT = ["boxes", "scores", "landmarks", "num_faces"]


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector()


@pytest.fixture(scope="module")
def embedder() -> FaceEmbedder:
    return FaceEmbedder()


@pytest.fixture(scope="module")
def candidates(detector: FaceDetector) -> tuple[np.ndarray, list[str]]:
    """256² candidates: Tom Hanks ×2 (different crops), 3 other people, a no-face patch, a 2-face crop."""
    tom = photo("tom_hanks")
    t1 = photo("t1")
    tom_box = detector.detect(tom).boxes[0]
    t1_boxes = detector.detect(t1).boxes
    images, labels = [], []
    images += [square_crop(tom, tom_box, 0.8), square_crop(tom, tom_box, 0.5)]
    labels += ["tom", "tom"]
    for b in t1_boxes[:3]:
        images.append(square_crop(t1, b, 0.8))
        labels.append("other")
    images.append(np.full((256, 256, 3), 127, np.uint8))
    labels.append("noface")
    order = np.argsort(t1_boxes[:, 0])
    a, b = t1_boxes[order[0]], t1_boxes[order[1]]
    both = np.array([min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])])
    images.append(square_crop(t1, both, 0.1))
    labels.append("two")
    return np.stack(images), labels


def test_face_models_ready(client) -> None:
    for model in ("face_detector", "face_embedder", "face_select"):
        assert client.model_ready(model), model


def test_detector_over_grpc_matches_in_process(client, detector: FaceDetector) -> None:
    t1 = photo("t1")
    out = client.infer("face_detector", {"images": t1[None]}, DET_OUT)
    assert out["num_faces"].tolist() == [[6]]
    local = detector.detect(t1)
    np.testing.assert_allclose(out["boxes"][0, :6], local.boxes, atol=1e-3)
    np.testing.assert_allclose(out["landmarks"][0, :6], local.landmarks, atol=1e-3)


def test_detector_batch_pads_and_counts(client) -> None:
    tom = square_crop(photo("tom_hanks"), np.array([100, 100, 200, 200]), 1.0)
    blank = np.zeros_like(tom)
    out = client.infer("face_detector", {"images": np.stack([tom, blank, tom])}, DET_OUT)
    assert out["num_faces"].reshape(-1).tolist()[1] == 0
    assert out["boxes"].shape[0] == 3 and out["landmarks"].shape[2:] == (5, 2)


def test_detector_wrong_dtype_is_invalid_argument(client) -> None:
    with pytest.raises(InvalidInputError, match="images"):
        client.infer("face_detector", {"images": np.zeros((1, 32, 32, 3), np.float32)}, DET_OUT)
    assert client.model_ready("face_detector")


def test_embedder_over_grpc_matches_in_process(client, detector, embedder) -> None:
    t1 = photo("t1")
    chips = align_faces(t1, detector.detect(t1).landmarks)
    out = client.infer("face_embedder", {"faces": chips}, ["embeddings", "descriptors"])
    np.testing.assert_allclose(out["descriptors"], embedder.descriptors(chips), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out["embeddings"], axis=1), 1.0, atol=1e-5)


def test_embedder_wrong_chip_size(client) -> None:
    with pytest.raises(InvalidInputError, match="faces"):
        client.infer("face_embedder", {"faces": np.zeros((1, 112, 112, 3), np.uint8)}, ["embeddings"])


def _tom_reference(detector, embedder) -> np.ndarray:
    tom = photo("tom_hanks")
    return embedder.embed(align_faces(tom, detector.detect(tom).landmarks[:1]))


def test_select_ranks_the_user_first(client, candidates, detector, embedder) -> None:
    images, labels = candidates
    ref = _tom_reference(detector, embedder)
    out = client.infer(
        "face_select",
        {"images": images, "reference_embedding": ref, "top_k": np.array([3], np.int32)},
        ["images", "similarity", "rank", "selected"],
    )
    rank, sim, selected = out["rank"], out["similarity"], out["selected"]
    assert [labels[i] for i in selected[:2]] == ["tom", "tom"]
    assert len(selected) == 3 and out["images"].shape == (3, 256, 256, 3)
    np.testing.assert_array_equal(out["images"], images[selected])
    for i, label in enumerate(labels):
        if label in ("noface", "two"):
            assert rank[i] == -1 and np.isnan(sim[i]), label
        else:
            assert rank[i] >= 0
    # the same code in-process gives the same answer
    local, _ = select_portraits(
        images,
        ref,
        3,
        lambda x: pack_detections(detector.detect_batch(list(x))),
        embedder.embed,
    )
    np.testing.assert_array_equal(local.rank, rank)
    np.testing.assert_allclose(local.similarity, sim, atol=1e-5, equal_nan=True)


def test_select_by_user_id(client, candidates, detector, embedder, users_dir) -> None:
    images, labels = candidates
    UserRegistry(users_dir).save_reference_embedding("tom-hanks", _tom_reference(detector, embedder))
    grant(UserRegistry(users_dir), "tom-hanks")
    out = client.infer(
        "face_select",
        {"images": images, "user_id": np.array([b"tom-hanks"], dtype=object)},
        ["rank", "selected"],
    )
    assert labels[out["selected"][0]] == "tom"


@pytest.mark.parametrize(
    "user, error, match",
    [
        (b"nobody", NotFoundError, "unknown user 'nobody'"),
        (b"../etc", InvalidInputError, "not a valid user id"),
        (b"a/b", InvalidInputError, "not a valid user id"),
    ],
)
def test_select_bad_user(client, candidates, user, error, match) -> None:
    images, _ = candidates
    with pytest.raises(error, match=match):
        client.infer("face_select", {"images": images[:2], "user_id": np.array([user], dtype=object)}, ["rank"])
    assert client.model_ready("face_select")


def test_select_needs_exactly_one_reference(client, candidates) -> None:
    images, _ = candidates
    with pytest.raises(InvalidInputError, match="one of reference_embedding or user_id is required"):
        client.infer("face_select", {"images": images[:2]}, ["rank"])
    with pytest.raises(InvalidInputError, match="not both"):
        client.infer(
            "face_select",
            {
                "images": images[:2],
                "reference_embedding": np.ones((1, 128), np.float32),
                "user_id": np.array([b"x"], dtype=object),
            },
            ["rank"],
        )


def test_select_bad_reference(client, candidates) -> None:
    images, _ = candidates
    with pytest.raises(InvalidInputError, match="reference_embedding: must be finite and non-zero"):
        client.infer("face_select", {"images": images[:2], "reference_embedding": np.zeros((1, 128), np.float32)}, ["rank"])
