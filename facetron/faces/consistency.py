"""Identity consistency of a photo set, and choosing the face of a photo.

FaceChain keeps every detected face; facetron drops strangers. Uploads are
small (3-5 photos is typical), so the rules must work there:

* **leave-one-out score**: each face's cosine to the mean of the *other*
  faces (a stranger cannot pull its own reference towards itself);
* **robust threshold**: a face is an outlier when its score lies more than
  ``k`` robust sigmas below the set's median score, sigma = 1.4826 x the
  median absolute deviation, floored at ``min_sigma`` (the spread of
  genuine photos; a floor keeps three near-identical photos from making
  every small difference an outlier). A mean/std rule cannot do this: with
  the population sigma no z-score exceeds sqrt(n - 1), so a 2-sigma rule
  never fires for 5 photos or fewer;
* **dlib's same-person rule** (descriptor distance < 0.6), leave-one-out: a
  face must be within 0.6 of at least half of the other faces.

Sets of fewer than 3 faces keep everything: there is no majority to say
which face is the stranger.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DLIB_SAME_PERSON = 0.6  # dlib's rule: descriptor distance below it = the same person
MAD_TO_SIGMA = 1.4826  # median absolute deviation -> standard deviation (normal data)


@dataclass(frozen=True)
class ConsistencyResult:
    keep: np.ndarray  # bool [N]
    scores: np.ndarray  # float32 [N]: cosine to the mean of the other faces (leave-one-out)
    threshold: float  # robust rule: scores below it are outliers
    matches: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # share of others within 0.6
    reasons: list[str] = field(default_factory=list)  # per face: "" (kept) or why it was dropped


def leave_one_out_scores(embeddings: np.ndarray) -> np.ndarray:
    """Each face's cosine to the L2-normalised mean of the other faces."""
    emb = np.asarray(embeddings, dtype=np.float64)
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    others = emb.sum(axis=0, keepdims=True) - emb
    others /= np.maximum(np.linalg.norm(others, axis=1, keepdims=True), 1e-12)
    return (emb * others).sum(axis=1).astype(np.float32)


def identity_outliers(embeddings: np.ndarray, k: float = 3.0, min_sigma: float = 0.02,
                      descriptors: np.ndarray | None = None,
                      same_person: float = DLIB_SAME_PERSON) -> ConsistencyResult:
    """Flag faces that do not look like the rest of the set (module docstring).

    ``embeddings`` [N, D] (L2-normalised or not); ``descriptors`` [N, 128]:
    dlib's raw vectors for the same-person rule (None: that rule is off)."""
    emb = np.asarray(embeddings, dtype=np.float32)
    n = emb.shape[0]
    if n < 3:
        ones = np.ones(n, np.float32)
        return ConsistencyResult(np.ones(n, bool), ones, float("-inf"), ones.copy(), [""] * n)
    scores = leave_one_out_scores(emb)
    med = float(np.median(scores))
    sigma = max(MAD_TO_SIGMA * float(np.median(np.abs(scores - med))), min_sigma)
    threshold = med - k * sigma
    keep = scores >= threshold
    reasons = ["" if ok else f"identity: cosine {s:.3f} to the other photos' mean is more than {k:g} robust sigmas "
               f"below the set's median {med:.3f} (threshold {threshold:.3f})" for ok, s in zip(keep, scores)]
    matches = np.ones(n, np.float32)
    if descriptors is not None:
        d = np.asarray(descriptors, dtype=np.float64)
        dist = np.linalg.norm(d[:, None] - d[None], axis=-1)
        matches = (((dist < same_person).sum(axis=1) - 1) / (n - 1)).astype(np.float32)
        for i in np.flatnonzero(keep & (matches < 0.5)):
            keep[i] = False
            reasons[i] = (f"identity: within dlib's same-person distance {same_person} of only "
                          f"{int(round(matches[i] * (n - 1)))} of the {n - 1} other photos (at least half needed)")
    return ConsistencyResult(keep, scores, float(threshold), matches, reasons)


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
