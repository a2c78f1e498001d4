"""Rank candidate portraits by identity: FaceChain's post-processing pick.

A candidate survives when it holds exactly one face whose size lies within
bounds; survivors are ranked by cosine similarity of their face embedding
to the user's reference embedding. ``rank`` is each candidate's 0-based
place (0 = best); filtered candidates get rank -1 and similarity NaN.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from facetron import contract


@dataclass(frozen=True)
class SelectRules:
    """face_select's thresholds (the defaults and their meaning: facetron.contract, MIN_FACE_FRAC ...)."""

    min_face_frac: float = contract.MIN_FACE_FRAC  # face box short side / image short side
    max_face_frac: float = contract.MAX_FACE_FRAC
    min_score: float = contract.MIN_FACE_SCORE
    bystander_area: float = contract.BYSTANDER_AREA  # faces smaller than this x the largest are background


@dataclass
class Selection:
    similarity: np.ndarray  # float32 [N], NaN where filtered
    rank: np.ndarray  # int32 [N], -1 where filtered
    order: np.ndarray  # int32 [k]: candidate indices, best first (top-k)
    reasons: list[str] = field(default_factory=list)  # per candidate: "" or why it was filtered
    face: np.ndarray | None = None  # int32 [N]: the detection row of each kept candidate's face, -1 where filtered


def face_filter(
    num_faces: np.ndarray, boxes: np.ndarray, scores: np.ndarray, image_hw: tuple[int, int], rules: SelectRules
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Per candidate: does it pass "exactly one face within size bounds"?

    A face counts when its score reaches ``min_score`` and its area is at
    least ``bystander_area`` of the largest face's (small background faces,
    e.g. people behind the subject of a template photo, do not count).
    ``boxes`` [N,K,4] / ``scores`` [N,K] padded, ``num_faces`` [N]. Returns
    (keep [N], reasons, face index [N], -1 where filtered)."""
    n = len(num_faces)
    short = float(min(image_hw))
    ok = np.zeros(n, bool)
    chosen = np.full(n, -1, np.int32)
    reasons = []
    for i in range(n):  # N candidates (a handful), not a hot loop over pixels
        k = int(num_faces[i])
        b, sc = boxes[i, :k], scores[i, :k]
        areas = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
        confident = sc >= rules.min_score
        big = confident & (areas >= rules.bystander_area * (areas[confident].max() if confident.any() else 0))
        valid = np.flatnonzero(big)
        if len(valid) != 1:
            reasons.append(f"{len(valid)} faces (exactly one required)")
            continue
        x1, y1, x2, y2 = b[valid[0]]
        frac = min(x2 - x1, y2 - y1) / short
        if frac < rules.min_face_frac:
            reasons.append(f"face too small ({frac:.2f} of the image < {rules.min_face_frac})")
        elif frac > rules.max_face_frac:
            reasons.append(f"face too large ({frac:.2f} of the image > {rules.max_face_frac})")
        else:
            ok[i] = True
            chosen[i] = int(valid[0])
            reasons.append("")
    return ok, reasons, chosen


def rank_by_identity(embeddings: np.ndarray, reference: np.ndarray, keep: np.ndarray, top_k: int) -> Selection:
    """Rank kept candidates by cosine similarity to ``reference`` [1, D].

    ``embeddings`` [N, D] are L2-normalised (rows of filtered candidates are
    ignored). Ties keep the candidates' input order (stable sort)."""
    n = len(keep)
    ref = np.asarray(reference, dtype=np.float32).reshape(1, -1)
    ref = ref / max(float(np.linalg.norm(ref)), 1e-12)
    sim = np.full(n, np.nan, dtype=np.float32)
    if keep.any():
        sim[keep] = (np.asarray(embeddings, dtype=np.float32)[keep] @ ref.T)[:, 0]
    return rank_by_similarity(sim, keep, top_k)


def rank_by_similarity(similarity: np.ndarray, keep: np.ndarray, top_k: int) -> Selection:
    """Rank the kept candidates by ``similarity`` [N] (NaN where not kept);
    ties keep the input order."""
    keep = np.asarray(keep, bool)
    sim = np.where(keep, np.asarray(similarity, np.float32), np.float32(np.nan)).astype(np.float32)
    kept = np.flatnonzero(keep)
    ordered = kept[np.argsort(-sim[kept], kind="stable")]
    rank = np.full(len(keep), -1, dtype=np.int32)
    rank[ordered] = np.arange(len(ordered), dtype=np.int32)
    k = len(ordered) if top_k <= 0 else min(top_k, len(ordered))
    return Selection(similarity=sim, rank=rank, order=ordered[:k].astype(np.int32))


def face_offset(landmarks: np.ndarray, at: np.ndarray) -> tuple[np.ndarray, float]:
    """(distance of each face's eye midpoint from ``at``'s, ``at``'s eye distance) for
    ``landmarks`` [..., 5, 2] and ``at`` [5, 2]: a face whose offset is within that
    eye distance is at ``at``'s place (the one rule for "the same face, not a bystander")."""
    offset = np.linalg.norm(landmarks[..., :2, :].mean(-2) - at[:2].mean(0), axis=-1)
    return offset, float(np.linalg.norm(at[1] - at[0]))
