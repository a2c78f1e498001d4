"""Identity consistency of a photo set, and choosing the face of a photo.

FaceChain keeps every detected face; facetron drops strangers with
PhotoMaker's rule: each face's identity score is the sum of its cosine
similarities to all other faces; faces scoring more than ``k`` standard
deviations below the mean are outliers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ConsistencyResult:
    keep: np.ndarray  # bool [N]
    scores: np.ndarray  # float32 [N], mean cosine to the others
    threshold: float  # scores below it were dropped


def identity_outliers(embeddings: np.ndarray, k: float = 2.0, min_similarity: float = 0.0) -> ConsistencyResult:
    """Flag faces that do not look like the rest of the set.

    ``embeddings`` are L2-normalised [N, D]. A face is kept when its mean
    cosine to the others is within ``k`` sigma of the set's mean, and at
    least ``min_similarity``. Sets of fewer than 3 faces keep everything
    (no majority to compare against) unless ``min_similarity`` rejects."""
    emb = np.asarray(embeddings, dtype=np.float32)
    n = emb.shape[0]
    if n == 0:
        return ConsistencyResult(np.zeros(0, bool), np.zeros(0, np.float32), 0.0)
    if n == 1:
        return ConsistencyResult(np.ones(1, bool), np.ones(1, np.float32), float(min_similarity))
    sims = emb @ emb.T
    np.fill_diagonal(sims, 0.0)
    scores = (sims.sum(axis=1) / (n - 1)).astype(np.float32)
    if n < 3:
        threshold = float(min_similarity)
    else:
        threshold = max(float(scores.mean() - k * scores.std()), float(min_similarity))
    return ConsistencyResult(scores >= threshold, scores, threshold)


def dominant_face(boxes: np.ndarray, ratio: float = 4.0) -> int | None:
    """Index of the face to keep in a photo, or None.

    One face: it. Several: the largest, only if its area is at least
    ``ratio`` times the second largest (FaceChain's rule); else None."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if len(boxes) == 0:
        return None
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    order = np.argsort(-areas)
    if len(boxes) == 1 or areas[order[0]] >= ratio * areas[order[1]]:
        return int(order[0])
    return None


def reference_embedding(embeddings: np.ndarray) -> np.ndarray:
    """The user's identity: mean of kept embeddings, L2-normalised, [1, D]."""
    mean = np.asarray(embeddings, dtype=np.float32).mean(axis=0, keepdims=True)
    return mean / max(float(np.linalg.norm(mean)), 1e-12)
