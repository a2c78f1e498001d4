"""Rank candidate portraits by identity: FaceChain's post-processing pick.

A candidate survives when it holds exactly one face whose size lies within
bounds; survivors are ranked by cosine similarity of their face embedding
to the user's reference embedding. ``rank`` is each candidate's 0-based
place (0 = best); filtered candidates get rank -1 and similarity NaN.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class SelectRules:
    min_face_frac: float = 0.08  # face box short side / image short side
    max_face_frac: float = 0.95
    min_score: float = 0.90


@dataclass
class Selection:
    similarity: np.ndarray  # float32 [N], NaN where filtered
    rank: np.ndarray  # int32 [N], -1 where filtered
    order: np.ndarray  # int32 [k]: candidate indices, best first (top-k)
    reasons: list[str] = field(default_factory=list)  # per candidate: "" or why it was filtered


def face_filter(
    num_faces: np.ndarray, boxes: np.ndarray, scores: np.ndarray, image_hw: tuple[int, int], rules: SelectRules
) -> tuple[np.ndarray, list[str]]:
    """Per candidate: does it pass "exactly one face within size bounds"?

    ``boxes`` [N,K,4] / ``scores`` [N,K] padded, ``num_faces`` [N]."""
    n = len(num_faces)
    short = float(min(image_hw))
    ok = np.zeros(n, bool)
    reasons = []
    for i in range(n):  # N candidates (a handful), not a hot loop over pixels
        k = int(num_faces[i])
        valid = [j for j in range(k) if scores[i, j] >= rules.min_score]
        if len(valid) != 1:
            reasons.append(f"{len(valid)} faces (exactly one required)")
            continue
        x1, y1, x2, y2 = boxes[i, valid[0]]
        frac = min(x2 - x1, y2 - y1) / short
        if frac < rules.min_face_frac:
            reasons.append(f"face too small ({frac:.2f} of the image < {rules.min_face_frac})")
        elif frac > rules.max_face_frac:
            reasons.append(f"face too large ({frac:.2f} of the image > {rules.max_face_frac})")
        else:
            ok[i] = True
            reasons.append("")
    return ok, reasons


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
    kept = np.flatnonzero(keep)
    ordered = kept[np.argsort(-sim[kept], kind="stable")]
    rank = np.full(n, -1, dtype=np.int32)
    rank[ordered] = np.arange(len(ordered), dtype=np.int32)
    k = len(ordered) if top_k <= 0 else min(top_k, len(ordered))
    return Selection(similarity=sim, rank=rank, order=ordered[:k].astype(np.int32))
