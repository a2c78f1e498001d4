"""Rank candidate portraits by identity: ``face_select``'s logic with the
detector and embedder passed in as functions. Survivors of the per-face
rules (:mod:`facetron.faces.select`) are ranked by cosine similarity of their
face embedding to the user's reference embedding; ``rank`` is each
candidate's 0-based place (0 = best), filtered candidates get rank -1 and
similarity NaN.

Inside Triton they are BLS calls to ``face_detector`` / ``face_embedder``
(:mod:`facetron.triton.bls`); in-process (tests, benchmarks, the CLI) they
are the local models. Same code, so "Triton vs in-process" compares
transport only."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from facetron import contract, metrics
from facetron.contract import FaceSelectParams
from facetron.errors import InvalidInputError
from facetron.faces.alignment import align_faces
from facetron.faces.select import SelectRules, face_filter, face_offset, subject_faces

BYSTANDER = "the face found is not where the template's face was (a bystander)"
DetectFn = Callable[[np.ndarray], dict[str, np.ndarray]]  # images [N,H,W,3] -> packed detections


EmbedFn = Callable[[np.ndarray], np.ndarray]  # chips [M,150,150,3] -> embeddings [M,128]


@dataclass
class Selection:
    similarity: np.ndarray  # float32 [N], NaN where filtered
    rank: np.ndarray  # int32 [N], -1 where filtered
    order: np.ndarray  # int32 [k]: candidate indices, best first (top-k)
    reasons: list[str] = field(default_factory=list)  # per candidate: "" or why it was filtered
    face: np.ndarray | None = None  # int32 [N]: the detection row of each kept candidate's face, -1 where filtered
    subject: np.ndarray | None = None  # int32 [N]: the subject's face in every candidate (faces.select.subject_faces), -1 = none



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


def select_rules(params: FaceSelectParams = FaceSelectParams()) -> SelectRules:
    return SelectRules(min_face_frac=params.min_face_frac, max_face_frac=params.max_face_frac,
                       min_score=params.min_score)


def check_candidates(images: np.ndarray, name: str = "images") -> np.ndarray:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise InvalidInputError(name, f"expected dtype uint8, got {getattr(images, 'dtype', type(images).__name__)}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise InvalidInputError(name, f"expected shape [N, H, W, 3] (RGB), got {list(images.shape)}")
    if images.shape[0] == 0:
        raise InvalidInputError(name, "expected at least one candidate image, got N=0")
    if images.shape[0] > contract.MAX_CANDIDATES:
        raise InvalidInputError(name, f"at most {contract.MAX_CANDIDATES} candidates per call, got {images.shape[0]}")
    if min(images.shape[1:3]) < contract.MIN_CANDIDATE_SIDE:
        raise InvalidInputError(name, f"images must be at least {contract.MIN_CANDIDATE_SIDE}x"
                                      f"{contract.MIN_CANDIDATE_SIDE} px, got {images.shape[2]}x{images.shape[1]}")
    return images


def check_reference(reference: np.ndarray, name: str = "reference_embedding") -> np.ndarray:
    ref = np.asarray(reference)
    if ref.dtype != np.float32:
        raise InvalidInputError(name, f"expected dtype float32, got {ref.dtype}")
    if ref.shape != (1, contract.EMBEDDING_DIM):
        raise InvalidInputError(name, f"expected shape [1, {contract.EMBEDDING_DIM}], got {list(ref.shape)}")
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
    at: np.ndarray | None = None,
) -> tuple[Selection, dict[str, np.ndarray]]:
    """Filter "exactly one face within size bounds", rank by identity, top-k.

    ``at`` (template mode: the template face's 5 landmarks): a face counts only
    where the template's face was — its eyes within one eye distance of the
    template's —, not a bystander at the edge of the photo."""
    check_candidates(images)
    check_reference(reference)
    if top_k < 0:
        raise InvalidInputError("top_k", f"must be >= 0 (0 = all), got {top_k}")
    dets = detect(images)
    keep, reasons, face = face_filter(dets["num_faces"].reshape(-1), dets["boxes"], dets["scores"], images.shape[1:3], rules)
    if at is not None:
        offset, span = face_offset(dets["landmarks"][np.arange(len(images)), np.maximum(face, 0)], at)
        away = keep & (offset > span)
        reasons = [BYSTANDER if a else r for a, r in zip(away, reasons)]
        keep, face = keep & ~away, np.where(away, -1, face).astype(face.dtype)
    subject = subject_faces(dets, face, images.shape[1:3], at)
    metrics.current().candidates(reasons)
    embeddings = np.zeros((len(images), contract.EMBEDDING_DIM), np.float32)
    if keep.any():
        idx = np.flatnonzero(keep)
        chips = np.concatenate([align_faces(images[i], dets["landmarks"][i, face[i] : face[i] + 1]) for i in idx])
        embeddings[idx] = embed(chips)
    selection = rank_by_identity(embeddings, reference, keep, top_k)
    selection.reasons, selection.face, selection.subject = reasons, face, subject
    return selection, dets


def selection_outputs(images: np.ndarray, selection: Selection) -> dict[str, np.ndarray]:
    """face_select's outputs (contract.SELECT_OUTPUTS) for a selection of ``images``."""
    return {
        "images": np.ascontiguousarray(images[selection.order]),
        "similarity": selection.similarity,
        "rank": selection.rank,
        "selected": selection.order,
    }
