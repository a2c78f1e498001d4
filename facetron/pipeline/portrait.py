"""The ``portrait`` model: the one call a client makes, on one in-process path.

A request is parsed and validated once, its template fitted and its face
found once; then:

1. generate (nets over BLS);
2. rank what was generated: ``face_select``'s rules on the pre-fusion
   candidates (face_detector + face_embedder over BLS) give each
   candidate's ``similarity_generated``;
3. fuse: the user's best photo (the registry's template, chosen by quality
   at registration) is blended into each candidate's generated face with
   ``fusion_strength`` (:mod:`facetron.faces.fusion`; 0 = no fusion);
4. score the returned pictures: ``similarity_final``, the fused face aligned
   at the landmarks it was fused at (no second detection);
5. answer: ``similarity`` is the one that ranked — the generated one; only
   when no generated candidate holds a face (the tiny smoke model never
   makes one) and fusion put one there, the final one, and the report says
   so (``ranked_by``, ``ranked_by_reason``).

``portrait_stream`` runs the same path with a progress callback.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from facetron import contract, metrics
from facetron.contract import FaceSelectParams, check_fusion_strength
from facetron.diffusion.sampler import ProgressFn
from facetron.errors import InvalidInputError
from facetron.faces.alignment import align_faces
from facetron.faces.fusion import FUSERS
from facetron.faces.select import Selection, rank_by_identity, rank_by_similarity
from facetron.pipeline.selection import (
    DetectFn,
    EmbedFn,
    select_portraits,
    select_rules,
)
from facetron.pipeline.template import PreparedTemplate, main_face
from facetron.request import one_scalar
from facetron.triton import bls
from facetron.triton.generator import ServedGenerator
from facetron.users import validate_user_id

FUSER = "blend"


@dataclass(frozen=True)
class PortraitOptions:
    top_k: int = 0  # 0 = all candidates
    fusion_strength: float = contract.DEFAULT_FUSION_STRENGTH


def portrait_options(arrays: dict[str, np.ndarray]) -> PortraitOptions:
    """top_k, and the fusion strength from ``fusion_strength`` / ``fuse``
    (``fuse=false`` is strength 0; with a strength > 0 it is a contradiction)."""
    top_k = one_scalar(arrays["top_k"], "top_k", np.int32) if arrays.get("top_k") is not None else 0
    fuse = one_scalar(arrays["fuse"], "fuse", np.bool_) if arrays.get("fuse") is not None else None
    strength = (one_scalar(arrays["fusion_strength"], "fusion_strength", np.float32)
                if arrays.get("fusion_strength") is not None else None)
    if strength is not None:
        strength = check_fusion_strength(strength)
    if fuse is False:
        if strength:
            raise InvalidInputError("fuse", f"false turns fusion off, but fusion_strength is {strength:g}: "
                                            "send one of them (fusion_strength 0 == fuse false)")
        strength = 0.0
    return PortraitOptions(int(top_k), contract.DEFAULT_FUSION_STRENGTH if strength is None else float(strength))


def at_template_face(landmarks: np.ndarray, template: PreparedTemplate) -> bool:
    """Is a face found in a generated picture the one the template asked for
    (its eyes within one eye distance of the template face's), not a bystander?"""
    there = template.landmarks
    return bool(np.linalg.norm(landmarks[:2].mean(0) - there[:2].mean(0)) <= np.linalg.norm(there[1] - there[0]))


def template_ranking(ranking: Selection, dets: dict[str, np.ndarray], template: PreparedTemplate) -> Selection:
    """Template mode: a candidate whose one face is not where the template's
    face was is filtered like one without a face (its score is a bystander's)."""
    keep = ranking.rank >= 0
    reasons = list(ranking.reasons)
    for i in np.flatnonzero(keep):
        if not at_template_face(dets["landmarks"][i, ranking.face[i]], template):
            keep[i] = False
            reasons[i] = "the face found is not where the template's face was (a bystander)"
    out = rank_by_similarity(ranking.similarity, keep, 0)
    out.reasons, out.face = reasons, np.where(keep, ranking.face, -1).astype(np.int32)
    return out


def fusion_targets(dets: dict[str, np.ndarray], ranking: Selection, shape: tuple[int, int],
                   template: Optional[PreparedTemplate]) -> tuple[list[Optional[np.ndarray]], list[Optional[str]]]:
    """Where to fuse in each candidate: its generated face (the one ranking
    scored; else its main detected face), or in template mode the template's
    face (the region the generator re-made) when no face was found there;
    None = nowhere. In template mode a detected face counts only where the
    template's face was (not a bystander at the edge of the photo)."""
    landmarks: list[Optional[np.ndarray]] = []
    kinds: list[Optional[str]] = []
    for i in range(len(ranking.rank)):
        j = int(ranking.face[i]) if ranking.face is not None and ranking.face[i] >= 0 else main_face(dets, i, shape)
        if j is not None and template is not None and not at_template_face(dets["landmarks"][i, j], template):
            j = None
        if j is not None:
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


def similarity_at(images: np.ndarray, landmarks: list[Optional[np.ndarray]], which: np.ndarray,
                  reference: np.ndarray, embed: EmbedFn) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings [N,128], cosine similarity [N]) of ``images[i]``'s face aligned
    at ``landmarks[i]`` for the candidates in ``which`` (NaN / zeros elsewhere)."""
    n = len(images)
    emb = np.zeros((n, contract.EMBEDDING_DIM), np.float32)
    sim = np.full(n, np.nan, np.float32)
    idx = np.flatnonzero(which)
    if len(idx):
        chips = np.concatenate([align_faces(images[i], landmarks[i][None]) for i in idx])
        emb[idx] = embed(chips)
        ref = reference.reshape(1, -1) / max(float(np.linalg.norm(reference)), 1e-12)
        sim[idx] = (emb[idx] @ ref.T)[:, 0]
    return emb, sim


def provenance(smoke: bool, ranked_by: str, strength: float) -> str:
    fusion = (f"the user's best photo blended into each generated face at fusion_strength {strength:g}"
              if strength > 0 else "no fusion (fusion_strength 0)")
    if smoke:
        return ("generated pixels come from the tiny smoke model (random weights + a LoRA trained for minutes): "
                "they are not portraits and hold no face of their own, so similarity_generated is NaN; "
                f"what you see of a face is {fusion}; ranked by similarity_{ranked_by} "
                "(the real face detector and embedder)")
    return (f"generated by the base model with the user's LoRA; ranked by similarity_{ranked_by}; "
            f"{fusion}")


def run_portrait(arrays: dict[str, np.ndarray], generator: ServedGenerator,
                 progress: Optional[ProgressFn] = None, *,
                 detect: DetectFn = bls.detect, embed: EmbedFn = bls.embed) -> dict[str, np.ndarray]:
    """``arrays``: the request's tensors by name. Returns the portrait outputs.
    ``detect`` / ``embed``: the face models (BLS calls inside Triton)."""
    # 1. parse and validate once
    if arrays.get("user_id") is None:
        raise InvalidInputError("user_id", "is required: portraits are ranked by the user's identity")
    options = portrait_options(arrays)
    job = generator.job(arrays)
    user_id = validate_user_id(job.user_id)
    reference = generator.registry.reference_embedding(user_id)
    timings: dict[str, float] = {}

    # 2. generate (the template fitted and its face found once)
    t0 = time.perf_counter()
    template = generator.template(job)
    generated = generator.images(job, template, progress)
    timings["generate_ms"] = (time.perf_counter() - t0) * 1e3

    # 3. rank what was generated (before any fusion)
    t0 = time.perf_counter()
    ranking, dets = select_portraits(generated, reference, 0, detect, embed, select_rules(FaceSelectParams()))
    if template is not None:
        ranking = template_ranking(ranking, dets, template)
    timings["select_ms"] = (time.perf_counter() - t0) * 1e3

    # 4. fuse the user's best photo into each generated face
    t0 = time.perf_counter()
    source = generator.registry.template(user_id) if options.fusion_strength > 0 else None
    targets, target_kinds = fusion_targets(dets, ranking, generated.shape[1:3], template)
    if source is not None:
        images, fused = fuse_candidates(generated, targets, source[0], source[1], options.fusion_strength)
    else:
        images, fused = generated, np.zeros(len(generated), bool)
    timings["fuse_ms"] = (time.perf_counter() - t0) * 1e3

    # 5. score the returned pictures (fused ones at the landmarks they were fused at)
    t0 = time.perf_counter()
    final_emb, sim_final = similarity_at(images, targets, fused, reference, embed)
    sim_generated = ranking.similarity
    sim_final = np.where(fused, sim_final, sim_generated).astype(np.float32)
    timings["score_ms"] = (time.perf_counter() - t0) * 1e3
    for name, ms in timings.items():
        metrics.current().stage(name.removesuffix("_ms"), ms / 1e3)

    # 6. the ranking that orders the answer
    if len(ranking.order) or not fused.any():
        ranked_by, reason, chosen = "generated", "the generated (pre-fusion) faces, as face_select ranks them", ranking
    else:
        ranked_by = "final"
        reason = ("no generated candidate held exactly one face within size bounds "
                  f"({'; '.join(sorted(set(r for r in ranking.reasons if r)))}): ranked by the fused pictures, "
                  "which measures the user's photo, not the generator")
        chosen = rank_by_identity(final_emb, reference, fused, 0)
    order = chosen.order if options.top_k <= 0 else chosen.order[: options.top_k]

    # 7. answer
    smoke = bool(generator.info.get("is_smoke_model"))
    report = {
        "user_id": user_id,
        "candidates": int(len(images)),
        "returned": int(len(order)),
        "ranked_by": ranked_by,
        "ranked_by_reason": reason,
        "seed": int(job.request.seed),
        "seed_source": "request" if arrays.get("seed") is not None else "random (repeat the call with this seed)",
        "fusion": {
            "strength": options.fusion_strength,
            "fuser": FUSER,
            "source": "the user's best photo by quality (registry template)" if source is not None else None,
            "fused": fused.tolist(),
            "at": [k if f else None for k, f in zip(target_kinds, fused)],
        },
        "filtered": [r or None for r in ranking.reasons],
        "timings_ms": {k: round(v, 1) for k, v in timings.items()},
        "base_model": generator.info.get("name"),
        "smoke_model": smoke,
        "provenance": provenance(smoke, ranked_by, options.fusion_strength if source is not None else 0.0),
        "mode": "template" if template is not None else "text-to-image",
    }
    return {
        "images": np.ascontiguousarray(images[order]),
        "similarity": chosen.similarity.astype(np.float32),
        "rank": chosen.rank.astype(np.int32),
        "selected": order.astype(np.int32),
        "similarity_generated": sim_generated.astype(np.float32),
        "similarity_final": sim_final,
        "report": np.array([json.dumps(report).encode()], dtype=object),
    }
