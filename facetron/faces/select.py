"""The per-face rules of FaceChain's post-processing pick: a candidate
survives when it holds exactly one face whose size lies within bounds
(:func:`face_filter`), and a face is "the same face, not a bystander" when its
eyes are within one eye distance of another's (:func:`face_offset`). The
ranking of survivors by identity is the selection stage's
(:mod:`facetron.pipeline.selection`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from facetron import contract


@dataclass(frozen=True)
class SelectRules:
    """face_select's thresholds (the defaults and their meaning: facetron.contract, MIN_FACE_FRAC ...)."""

    min_face_frac: float = contract.MIN_FACE_FRAC  # face box short side / image short side
    max_face_frac: float = contract.MAX_FACE_FRAC
    min_score: float = contract.MIN_FACE_SCORE
    bystander_area: float = contract.BYSTANDER_AREA  # faces smaller than this x the largest are background


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


def face_offset(landmarks: np.ndarray, at: np.ndarray) -> tuple[np.ndarray, float]:
    """(distance of each face's eye midpoint from ``at``'s, ``at``'s eye distance) for
    ``landmarks`` [..., 5, 2] and ``at`` [5, 2]: a face whose offset is within that
    eye distance is at ``at``'s place (the one rule for "the same face, not a bystander")."""
    offset = np.linalg.norm(landmarks[..., :2, :].mean(-2) - at[:2].mean(0), axis=-1)
    return offset, float(np.linalg.norm(at[1] - at[0]))


def main_face(dets: dict[str, np.ndarray], index: int, shape: tuple[int, int]) -> int | None:
    """The subject's face in image ``index``: among faces at least
    ``contract.BYSTANDER_AREA`` of the largest's area (as face_select counts
    them), the one nearest the image centre (templates often show neighbours'
    partial faces at the edges)."""
    k = int(dets["num_faces"].reshape(-1)[index])
    if k == 0:
        return None
    boxes = dets["boxes"][index, :k]
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    big = np.flatnonzero(areas >= contract.BYSTANDER_AREA * areas.max())
    centres = (boxes[big, :2] + boxes[big, 2:]) / 2
    dist = np.linalg.norm(centres - np.array([shape[1] / 2, shape[0] / 2]), axis=1)
    return int(big[np.argmin(dist)])


def subject_faces(dets: dict[str, np.ndarray], face: np.ndarray, shape: tuple[int, int],
                  at: np.ndarray | None = None) -> np.ndarray:
    """The subject's face in each picture (int32 [N], -1 = none): ``face[i]``
    where the filter kept one, else :func:`main_face`; with ``at`` (a template's
    face) a face counts only at ``at``'s place (:func:`face_offset`)."""
    subject = np.full(len(face), -1, np.int32)
    for i in range(len(face)):
        j = int(face[i]) if face[i] >= 0 else main_face(dets, i, shape)
        if j is not None and at is not None:  # a bystander away from the template's face does not count
            offset, span = face_offset(dets["landmarks"][i, j], at)
            j = j if offset <= span else None
        subject[i] = -1 if j is None else j
    return subject
