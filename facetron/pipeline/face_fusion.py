"""The fusion stage of a portrait call: where the user's best photo goes into
each generated picture (its generated face, or in template mode the
template's face where the generator made none), the blend itself
(:mod:`facetron.faces.fusion`), and the returned pictures scored again from a
fresh detection — a fused picture counts only where a face is found again."""

from __future__ import annotations

from typing import Optional

import numpy as np

from facetron import contract
from facetron.faces.alignment import align_faces
from facetron.faces.fusion import FUSERS
from facetron.faces.select import face_offset
from facetron.pipeline.selection import DetectFn, EmbedFn, Selection
from facetron.pipeline.template import PreparedTemplate

FUSER = "blend"


def fusion_targets(dets: dict[str, np.ndarray], ranking: Selection,
                   template: Optional[PreparedTemplate]) -> tuple[list[Optional[np.ndarray]], list[Optional[str]]]:
    """Where to fuse in each candidate: its subject's face as the selection
    stage found it (the one ranking scored, else its main face; in template
    mode only at the template's face, not a bystander), or in template mode the
    template's face (the region the generator re-made) when none was found
    there; None = nowhere."""
    landmarks: list[Optional[np.ndarray]] = []
    kinds: list[Optional[str]] = []
    for i, j in enumerate(ranking.subject):
        if j >= 0:
            landmarks.append(np.asarray(dets["landmarks"][i, j], np.float32))
            kinds.append("generated face")
        elif template is not None:
            landmarks.append(template.landmarks)
            kinds.append("template face (no face found in the generated picture)")
        else:
            landmarks.append(None)
            kinds.append(None)
    return landmarks, kinds


def fuse_candidates(images: np.ndarray, targets: list[Optional[np.ndarray]], source: np.ndarray,
                    source_landmarks: np.ndarray, strength: float, fuser: str = FUSER) -> tuple[np.ndarray, np.ndarray]:
    """Blend the user's photo into ``images[i]`` at ``targets[i]`` (5 landmarks;
    None leaves image i as generated). Returns (images, fused bool [N])."""
    fuse = FUSERS[fuser]
    out = images.copy()
    fused = np.zeros(len(images), bool)
    if strength <= 0:
        return out, fused
    for i, target in enumerate(targets):
        if target is not None:
            out[i] = fuse(images[i], target, source, source_landmarks, strength).image
            fused[i] = True
    return out, fused


def similarity_final(images: np.ndarray, targets: list[Optional[np.ndarray]], which: np.ndarray,
                     reference: np.ndarray, detect: DetectFn, embed: EmbedFn
                     ) -> tuple[np.ndarray, np.ndarray, list[Optional[str]]]:
    """Score the returned pictures ``images[i]`` for ``i`` in ``which`` from a
    fresh detection: the face found where ``targets[i]`` (the 5 landmarks it was
    fused at) says — its eyes within one eye distance of the target's —, aligned
    at its own landmarks and embedded. Returns (embeddings [N,128], cosine
    similarity [N], reason per picture): NaN and a reason where no face is found
    there; zeros / NaN / None for pictures not in ``which``."""
    n = len(images)
    emb = np.zeros((n, contract.EMBEDDING_DIM), np.float32)
    sim = np.full(n, np.nan, np.float32)
    reasons: list[Optional[str]] = [None] * n
    idx = np.flatnonzero(which)
    if not len(idx):
        return emb, sim, reasons
    dets = detect(images[idx])
    found, chips = [], []
    for row, i in enumerate(idx):
        target = targets[i]
        k = int(dets["num_faces"].reshape(-1)[row])
        dist, span = face_offset(dets["landmarks"][row, :k], target)
        j = int(np.argmin(dist)) if k else -1
        if j < 0 or dist[j] > span:
            reasons[i] = "no face detected where the user's photo was fused in the returned picture"
            continue
        found.append(i)
        chips.append(align_faces(images[i], dets["landmarks"][row, j : j + 1]))
    if found:
        emb[found] = embed(np.concatenate(chips))
        ref = reference.reshape(1, -1) / max(float(np.linalg.norm(reference)), 1e-12)
        sim[found] = (emb[found] @ ref.T)[:, 0]
    return emb, sim, reasons
