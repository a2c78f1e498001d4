"""facetron.client against the session's real tritonserver: sync and asyncio
APIs, error translation, retries (counted), shared memory."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import numpy as np
import pytest

from face_photos import photo, square_crop
from facetron.client import AsyncFacetronClient, FacetronClient, RetryPolicy
from facetron.client.grpc_client import portrait_request
from facetron.client.shm import leftover_regions
from facetron.errors import InvalidInputError, NotFoundError, ServerError
from facetron.faces.alignment import align_faces
from facetron.triton.server import free_port

pytestmark = pytest.mark.triton

PHOTO_IDS = [49406, 320, 1125, 539, 320, 786, 49407]  # "a photo of a man"


def _shm_files() -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").glob(f"facetron_{os.getpid()}_*"))


@pytest.fixture(scope="module")
def faces(triton) -> tuple[np.ndarray, np.ndarray]:
    """(Tom Hanks' embedding, 160² candidates: Tom ×2 crops then two other
    people), through the served detector + embedder."""
    tom, t1 = photo("tom_hanks"), photo("t1")
    with FacetronClient(triton.grpc_url) as c:
        tom_boxes, _, tom_marks = c.detect(tom).image(0)
        reference = c.embed(align_faces(tom, tom_marks[:1]))
        t1_boxes = c.detect(t1).image(0)[0]
    crops = [square_crop(tom, tom_boxes[0], m, 160) for m in (0.6, 0.4)]
    crops += [square_crop(t1, b, 0.8, 160) for b in t1_boxes[:2]]
    return reference, np.stack(crops)


# --- happy paths -----------------------------------------------------------------------


def test_sync_and_async_agree_on_every_model(triton, faces) -> None:
    tom_reference, candidates = faces
    t1 = photo("t1")

    with FacetronClient(triton.grpc_url) as c:
        assert c.is_ready() and c.model_ready("face_select") and not c.model_ready("no_such_model")
        ids = c.tokenize(["a photo of a man"])
        det = c.detect(t1)
        chips = align_faces(t1, det.image(0)[2])
        emb = c.embed(chips)
        sel = c.select(candidates, reference_embedding=tom_reference, top_k=2)

    async def run_async():
        async with AsyncFacetronClient(triton.grpc_url) as ac:
            assert await ac.is_ready() and await ac.model_ready("face_detector")
            return (
                await ac.tokenize(["a photo of a man"]),
                await ac.detect(t1),
                await ac.embed(chips),
                await ac.select(candidates, reference_embedding=tom_reference, top_k=2),
            )

    a_ids, a_det, a_emb, a_sel = asyncio.run(run_async())

    assert ids[0, : len(PHOTO_IDS)].tolist() == PHOTO_IDS and ids.shape == (1, 77)
    assert det.num_faces.tolist() == [6] and det.boxes.shape[:2] == (1, 6)
    assert emb.shape == (6, 128)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert sorted(sel.selected.tolist()) == [0, 1], "both Tom Hanks crops rank first"
    assert sel.images.shape == (2, 160, 160, 3)
    np.testing.assert_array_equal(a_ids, ids)
    np.testing.assert_array_equal(a_det.num_faces, det.num_faces)
    np.testing.assert_allclose(a_det.boxes, det.boxes, atol=1e-4)
    np.testing.assert_allclose(a_emb, emb, atol=1e-5)
    np.testing.assert_array_equal(a_sel.rank, sel.rank)


def test_detect_splits_batches_above_the_model_limit(client) -> None:
    tom = square_crop(photo("tom_hanks"), np.array([20, 20, 92, 92]), 0.6, 96)
    images = np.stack([tom] * 67 + [np.zeros_like(tom)])  # 64 + 4: two requests, re-joined
    det = client.detect(images)
    assert len(det) == 68 and det.num_faces[-1] == 0
    assert (det.num_faces[:67] == 1).all()
    np.testing.assert_allclose(det.boxes[66], det.boxes[0], atol=1e-3)


# --- errors ----------------------------------------------------------------------------


def test_invalid_argument_keeps_the_message_and_is_not_retried(triton) -> None:
    with FacetronClient(triton.grpc_url, retry=RetryPolicy(attempts=5, backoff_s=0.01)) as c:
        with pytest.raises(InvalidInputError, match="images") as info:
            c.infer("face_detector", {"images": np.zeros((1, 32, 32, 3), np.float32)}, ["boxes"])
        assert info.value.input_name == "images" and "UINT8" in str(info.value)
        with pytest.raises(InvalidInputError, match="reference_embedding: must be finite and non-zero"):
            c.infer("face_select", {"images": np.zeros((1, 64, 64, 3), np.uint8), "reference_embedding": np.zeros((1, 128), np.float32)}, ["rank"])
        assert c.stats.as_dict() == {"calls": 2, "attempts": 2, "failures": 2}


def test_not_found_names_the_model_or_user_and_is_not_retried(triton, faces) -> None:
    candidates = faces[1]
    with FacetronClient(triton.grpc_url, retry=RetryPolicy(attempts=5, backoff_s=0.01)) as c:
        with pytest.raises(NotFoundError, match="unknown model: 'no_such_model'"):
            c.infer("no_such_model", {"x": np.zeros(1, np.int32)}, ["y"])
        with pytest.raises(NotFoundError, match="unknown user 'nobody'"):
            c.select(candidates[:1], user_id="nobody")
        assert c.stats.attempts == 2


def test_deadline_is_a_server_error_and_not_retried(triton) -> None:
    big = np.zeros((8, 512, 512, 3), np.uint8)
    with FacetronClient(triton.grpc_url, timeout_s=60, retry=RetryPolicy(attempts=5)) as c:
        with pytest.raises(ServerError, match="timeout of 0.001 s") as info:
            c.detect(big, timeout_s=0.001)
        assert info.value.status == "DEADLINE_EXCEEDED" and c.stats.attempts == 1


def test_unreachable_server_is_retried_then_named() -> None:
    url = f"127.0.0.1:{free_port()}"  # nothing listens there
    policy = RetryPolicy(attempts=4, backoff_s=0.02, max_backoff_s=0.05)
    with FacetronClient(url, retry=policy) as c:
        t0 = time.perf_counter()
        with pytest.raises(ServerError, match=f"{url}.*gave up after 4 attempts") as info:
            c.tokenize(["hello"])
        assert info.value.status == "UNAVAILABLE"
        assert c.stats.as_dict() == {"calls": 1, "attempts": 4, "failures": 1}
        assert time.perf_counter() - t0 >= 3 * 0.02 * 0.5  # it did back off (jitter <= 50 %)
        assert not c.is_ready()

    async def run_async() -> AsyncFacetronClient:
        ac = AsyncFacetronClient(url, retry=RetryPolicy(attempts=3, backoff_s=0.01))
        try:
            with pytest.raises(ServerError, match=f"{url}.*gave up after 3 attempts"):
                await ac.tokenize(["hello"])
            return ac
        finally:
            await ac.close()

    assert asyncio.run(run_async()).stats.attempts == 3


def test_client_side_checks_name_the_argument() -> None:
    with pytest.raises(InvalidInputError, match="top_k: must be in 0..num_images"):
        portrait_request("demo", num_images=2, top_k=3)
    with pytest.raises(InvalidInputError, match="height: must be a multiple of 8 in 32..2048"):
        portrait_request("demo", height=100)
    with pytest.raises(InvalidInputError, match="user_id: '../x' is not a valid user id"):
        portrait_request("../x")
    with pytest.raises(InvalidInputError, match="strength: only applies with a template"):
        portrait_request("demo", strength=0.5)
    with pytest.raises(InvalidInputError, match="url"):
        FacetronClient("no-port-here")


# --- shared memory ---------------------------------------------------------------------


def _large_batch(n: int = 16) -> np.ndarray:
    """n different 512² photos (the astronaut, shifted), ~12.6 MB for n=16."""
    base = photo("astronaut")
    return np.stack([np.roll(base, 9 * i, axis=1) for i in range(n)])


def test_shm_gives_identical_results_for_a_large_batch(client) -> None:
    images = _large_batch()
    outputs = ["boxes", "scores", "landmarks", "num_faces"]
    client.infer("face_detector", {"images": images[:2]}, outputs)  # warm-up
    timings = {}
    t0 = time.perf_counter()
    plain = client.infer("face_detector", {"images": images}, outputs)
    timings["grpc"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    via_shm = client.infer("face_detector", {"images": images}, outputs, use_shm=True)
    timings["shm_inputs"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    all_shm = client.infer("face_detector", {"images": images}, outputs, use_shm=True, shm_output_bytes=1 << 20)
    timings["shm_inputs_outputs"] = time.perf_counter() - t0
    print(f"\nface_detector {images.shape} {images.nbytes / 1e6:.1f} MB: " + ", ".join(f"{k} {v:.3f} s" for k, v in timings.items()))
    assert plain["num_faces"].reshape(-1).tolist() == [1] * len(images)
    for name in outputs:
        np.testing.assert_array_equal(via_shm[name], plain[name])
        np.testing.assert_array_equal(all_shm[name], plain[name])
    assert leftover_regions() == [] and _shm_files() == []
    assert client.shared_memory_regions() == []


def test_shm_cleans_up_on_error_and_refuses_remote_servers(client, triton) -> None:
    with pytest.raises(InvalidInputError, match="images"):
        client.infer("face_detector", {"images": np.zeros((2, 64, 64, 3), np.float32)}, ["boxes"], use_shm=True)
    with pytest.raises(InvalidInputError, match="boxes.*size must be >= 1"):
        client.infer("face_detector", {"images": np.zeros((1, 64, 64, 3), np.uint8)}, ["boxes"], use_shm=True, shm_output_bytes={"boxes": 0})
    assert leftover_regions() == [] and _shm_files() == []
    assert client.shared_memory_regions() == []
    with FacetronClient("192.0.2.1:8001") as remote, pytest.raises(InvalidInputError, match="use_shm: .*not a loopback"):
        remote.infer("tokenizer", {"prompt": np.array([b"x"], dtype=object)}, ["input_ids"], use_shm=True)

    async def run_async() -> dict[str, np.ndarray]:  # asyncio client, BYTES input through shm
        async with AsyncFacetronClient(triton.grpc_url) as ac:
            return await ac.infer("tokenizer", {"prompt": np.array([b"a photo of a man"], dtype=object)}, ["input_ids"], use_shm=True, shm_output_bytes=4 * 77)

    assert asyncio.run(run_async())["input_ids"][0, : len(PHOTO_IDS)].tolist() == PHOTO_IDS
    assert leftover_regions() == [] and _shm_files() == []
