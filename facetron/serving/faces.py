"""The face path shared by Triton models and in-process callers.

``pack_detections`` is face_detector's output layout. ``select_portraits``
is face_select's logic with the detector and embedder passed in as
functions: inside Triton they are BLS calls to ``face_detector`` /
``face_embedder``; in-process (tests, benchmarks) they are the local
models. Same code, so "Triton vs in-process" compares transport only.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from facetron.errors import InvalidInputError
from facetron.faces.alignment import align_faces
from facetron.faces.select import SelectRules, Selection, face_filter, rank_by_identity

DetectFn = Callable[[np.ndarray], dict[str, np.ndarray]]  # images [N,H,W,3] -> packed detections
EmbedFn = Callable[[np.ndarray], np.ndarray]  # chips [M,150,150,3] -> embeddings [M,128]

MAX_CANDIDATES = 64


def pack_detections(dets: list) -> dict[str, np.ndarray]:
    """list[Detections] -> boxes [N,K,4], scores [N,K], landmarks [N,K,5,2], num_faces [N,1].

    K is the largest face count in the batch (at least 1 so shapes stay
    valid); rows past ``num_faces`` are zeros."""
    n = len(dets)
    k = max([len(d) for d in dets] + [1])
    boxes = np.zeros((n, k, 4), np.float32)
    scores = np.zeros((n, k), np.float32)
    marks = np.zeros((n, k, 5, 2), np.float32)
    counts = np.zeros((n, 1), np.int32)
    for i, d in enumerate(dets):
        m = len(d)
        boxes[i, :m], scores[i, :m], marks[i, :m], counts[i, 0] = d.boxes, d.scores, d.landmarks, m
    return {"boxes": boxes, "scores": scores, "landmarks": marks, "num_faces": counts}


def check_candidates(images: np.ndarray, name: str = "images") -> np.ndarray:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise InvalidInputError(name, f"expected dtype uint8, got {getattr(images, 'dtype', type(images).__name__)}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise InvalidInputError(name, f"expected shape [N, H, W, 3] (RGB), got {list(images.shape)}")
    if images.shape[0] == 0:
        raise InvalidInputError(name, "expected at least one candidate image, got N=0")
    if images.shape[0] > MAX_CANDIDATES:
        raise InvalidInputError(name, f"at most {MAX_CANDIDATES} candidates per call, got {images.shape[0]}")
    if min(images.shape[1:3]) < 16:
        raise InvalidInputError(name, f"images must be at least 16x16 px, got {images.shape[2]}x{images.shape[1]}")
    return images


def check_reference(reference: np.ndarray, name: str = "reference_embedding") -> np.ndarray:
    ref = np.asarray(reference)
    if ref.dtype != np.float32:
        raise InvalidInputError(name, f"expected dtype float32, got {ref.dtype}")
    if ref.shape != (1, 128):
        raise InvalidInputError(name, f"expected shape [1, 128], got {list(ref.shape)}")
    if not np.isfinite(ref).all() or float(np.linalg.norm(ref)) < 1e-6:
        raise InvalidInputError(name, "must be finite and non-zero")
    return ref


def select_portraits(
    images: np.ndarray,
    reference: np.ndarray,
    top_k: int,
    detect: DetectFn,
    embed: EmbedFn,
    rules: SelectRules = SelectRules(),
) -> tuple[Selection, dict[str, np.ndarray]]:
    """Filter "exactly one face within size bounds", rank by identity, top-k."""
    check_candidates(images)
    check_reference(reference)
    if top_k < 0:
        raise InvalidInputError("top_k", f"must be >= 0 (0 = all), got {top_k}")
    dets = detect(images)
    keep, reasons, face = face_filter(dets["num_faces"].reshape(-1), dets["boxes"], dets["scores"], images.shape[1:3], rules)
    embeddings = np.zeros((len(images), 128), np.float32)
    if keep.any():
        idx = np.flatnonzero(keep)
        chips = np.concatenate([align_faces(images[i], dets["landmarks"][i, face[i] : face[i] + 1]) for i in idx])
        embeddings[idx] = embed(chips)
    selection = rank_by_identity(embeddings, reference, keep, top_k)
    selection.reasons = reasons
    return selection, dets
