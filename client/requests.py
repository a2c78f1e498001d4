"""The served models' requests and results, written once for every front end.

* request builders (:func:`select_request`, :func:`portrait_request`) check
  what a client can check with the server's own rules
  (:mod:`facetron.contract`) and name the argument on error;
* result types (:class:`Detections`, :class:`SelectResult`,
  :class:`PortraitResult`) and their readers;
* operations: each model method of the clients as an :class:`Operation` —
  the requests to send, in order, and how to read their answers into the
  method's result. The threaded and the asyncio front ends
  (:mod:`facetron.client.api`) only execute them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Mapping, Sequence, TypeVar

import numpy as np

from facetron.client.retry import CallInfo
from facetron.client.tensors import bytes_tensor, number, rgb_images, scalar
from facetron.contract import (
    CLIENT_NUM_IMAGES,
    DETECTOR_OUTPUTS,
    FACE_DETECTOR,
    FACE_EMBEDDER,
    FACE_NET_MAX_BATCH,
    FACE_SELECT,
    PORTRAIT,
    PORTRAIT_OUTPUTS,
    SELECT_OUTPUTS,
    TOKENIZER,
    USER_TOKEN_HEADER,
    validate_user_id,
)
from facetron.errors import InvalidInputError
from facetron.request import PortraitRequest
from facetron.token_store import TokenStore

R = TypeVar("R")

# --- operations ------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One inference request of an operation."""

    model: str
    inputs: Mapping[str, np.ndarray]
    outputs: tuple[str, ...]
    use_shm: bool = False
    headers: Mapping[str, str] | None = field(default=None, repr=False)  # gRPC metadata (a user's token)


#: a call's answer: the outputs by name, and how the call went
Answer = tuple[dict[str, np.ndarray], CallInfo]


@dataclass(frozen=True)
class Operation(Generic[R]):
    """A model method without its transport: ``calls`` to make in order, and
    ``read`` turning their answers (same order) into the method's result."""

    calls: tuple[Call, ...]
    read: Callable[[list[Answer]], R]


def tokenize_op(prompts: Sequence[str] | str) -> Operation[np.ndarray]:
    """CLIP token ids ``int32 [N, 77]`` of ``prompts``."""
    if isinstance(prompts, str):
        prompts = [prompts]
    call = Call(TOKENIZER.name, {"prompt": bytes_tensor(prompts)}, ("input_ids",))
    return Operation((call,), lambda answers: answers[0][0]["input_ids"])


def detect_op(images: np.ndarray, use_shm: bool = False) -> Operation[Detections]:
    """Faces in RGB uint8 images (batches above the model's limit are split)."""
    images = rgb_images(images, "images")
    calls = tuple(Call(FACE_DETECTOR.name, {"images": b}, DETECTOR_OUTPUTS, use_shm) for b in batches(images))
    return Operation(calls, lambda answers: merge_detections([out for out, _ in answers]))


def embed_op(faces: np.ndarray) -> Operation[np.ndarray]:
    """Embeddings ``float32 [N, 128]`` of aligned chips (split like :func:`detect_op`)."""
    faces = rgb_images(faces, "faces")
    calls = tuple(Call(FACE_EMBEDDER.name, {"faces": b}, ("embeddings",)) for b in batches(faces))
    return Operation(calls, lambda answers: np.concatenate([out["embeddings"] for out, _ in answers]))


def user_of(user_id: str | PortraitRequest) -> str:
    return user_id.user_id if isinstance(user_id, PortraitRequest) else user_id


def user_headers(user_id: str | None, token: str | None = None) -> dict[str, str] | None:
    """The gRPC metadata that acts as ``user_id``: ``token``, else the one the operator's token
    store keeps for it (:mod:`facetron.token_store`); None when neither has one (the server then
    answers NOT_FOUND, as for an unknown user)."""
    token = token or (TokenStore().get(user_id) if user_id else None)
    return {USER_TOKEN_HEADER: token} if token else None


def infer_headers(inputs: Mapping[str, np.ndarray], headers: Mapping[str, str] | None) -> Mapping[str, str] | None:
    """A raw call's metadata: ``headers`` as given, else, when ``inputs`` name exactly one user
    (``user_id``, every item the same), that user's token from the operator's token store."""
    if headers is not None or "user_id" not in inputs:
        return headers
    names = {v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(inputs["user_id"], object).reshape(-1)}
    names.discard("")
    return user_headers(names.pop()) if len(names) == 1 else None


def select_op(
    images: np.ndarray, reference_embedding: np.ndarray | None, user_id: str | None, top_k: int,
    token: str | None = None,
) -> Operation[SelectResult]:
    call = Call(FACE_SELECT.name, select_request(images, reference_embedding, user_id, top_k), SELECT_OUTPUTS,
                headers=user_headers(user_id, token))
    return Operation((call,), lambda answers: select_result(answers[0][0]))


def portrait_op(inputs: Mapping[str, np.ndarray], headers: Mapping[str, str] | None = None) -> Operation[PortraitResult]:
    """The ``portrait`` call with ``inputs`` from :func:`portrait_request` (``headers``: :func:`user_headers`)."""
    call = Call(PORTRAIT.name, inputs, PORTRAIT_OUTPUTS, headers=headers)
    return Operation((call,), lambda answers: portrait_result(*answers[0]))


# --- face models -----------------------------------------------------------------------


@dataclass(frozen=True)
class Detections:
    """face_detector output for N images, padded to the largest face count K."""

    boxes: np.ndarray  # float32 [N, K, 4] x1, y1, x2, y2 (px)
    scores: np.ndarray  # float32 [N, K]
    landmarks: np.ndarray  # float32 [N, K, 5, 2]
    num_faces: np.ndarray  # int32 [N]

    def __len__(self) -> int:
        return len(self.num_faces)

    def image(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(boxes, scores, landmarks) of image ``i`` without padding rows."""
        k = int(self.num_faces[i])
        return self.boxes[i, :k], self.scores[i, :k], self.landmarks[i, :k]


def merge_detections(parts: Sequence[Mapping[str, np.ndarray]]) -> Detections:
    """Concatenate face_detector answers of sub-batches (re-padding K)."""
    k = max([p["boxes"].shape[1] for p in parts] + [0])

    def pad(a: np.ndarray) -> np.ndarray:
        widths = [(0, 0), (0, k - a.shape[1])] + [(0, 0)] * (a.ndim - 2)
        return np.pad(a, widths)

    return Detections(
        boxes=np.concatenate([pad(p["boxes"]) for p in parts]),
        scores=np.concatenate([pad(p["scores"]) for p in parts]),
        landmarks=np.concatenate([pad(p["landmarks"]) for p in parts]),
        num_faces=np.concatenate([p["num_faces"].reshape(-1) for p in parts]).astype(np.int32),
    )


def batches(array: np.ndarray, size: int = FACE_NET_MAX_BATCH) -> list[np.ndarray]:
    return [array[i : i + size] for i in range(0, len(array), size)]


@dataclass(frozen=True)
class SelectResult:
    """face_select output. ``similarity``/``rank`` are per input candidate
    (rank 0 = best; -1 and NaN = filtered out); ``images`` are the kept
    candidates best first, ``selected`` their input indices."""

    images: np.ndarray
    similarity: np.ndarray
    rank: np.ndarray
    selected: np.ndarray


def select_request(
    images: np.ndarray,
    reference_embedding: np.ndarray | None = None,
    user_id: str | None = None,
    top_k: int = 0,
) -> dict[str, np.ndarray]:
    """face_select inputs (exactly one of reference_embedding / user_id)."""
    if (reference_embedding is None) == (user_id is None):
        raise InvalidInputError("reference_embedding", "give exactly one of reference_embedding or user_id")
    if number(top_k, int, "top_k") < 0:
        raise InvalidInputError("top_k", f"must be >= 0 (0 = all), got {top_k}")
    inputs = {"images": rgb_images(images, "images"), "top_k": scalar(top_k, np.int32, "top_k")}
    if reference_embedding is not None:
        inputs["reference_embedding"] = np.asarray(reference_embedding, np.float32).reshape(1, -1)
    else:
        inputs["user_id"] = bytes_tensor([validate_user_id(str(user_id))])
    return inputs


def select_result(out: Mapping[str, np.ndarray]) -> SelectResult:
    return SelectResult(out["images"], out["similarity"].reshape(-1), out["rank"].reshape(-1), out["selected"].reshape(-1))


# --- portrait --------------------------------------------------------------------------


@dataclass(frozen=True)
class PortraitResult:
    """A ``portrait`` answer.

    ``images`` are the kept candidates best first (top_k); per generated
    candidate: ``similarity_generated`` (its generated face, before fusion),
    ``similarity_final`` (the returned picture, after fusion), ``similarity``
    (the one that ranked: ``report["ranked_by"]``) and ``rank`` (-1 / NaN =
    filtered out); ``selected`` are the candidate indices of ``images``;
    ``report`` is the server's JSON report (ranking, fusion, seed, stage
    timings, which model made what); ``timing`` is measured here (wall time
    of the call incl. retries, attempts, server).
    """

    images: np.ndarray
    similarity: np.ndarray
    rank: np.ndarray
    selected: np.ndarray
    report: dict[str, Any]
    timing: dict[str, Any]
    similarity_generated: np.ndarray | None = None
    similarity_final: np.ndarray | None = None

    @property
    def server(self) -> str:
        return str(self.timing.get("server", ""))

    @property
    def ranked_by(self) -> str:
        """Which similarity ranked: ``generated`` or ``final`` (the server's report)."""
        return str(self.report.get("ranked_by", "generated"))

    def candidates(self) -> list[dict[str, Any]]:
        """One JSON-ready row per generated candidate."""
        chosen = {int(c): i for i, c in enumerate(self.selected)}
        n = len(self.rank)
        gen = self.similarity_generated if self.similarity_generated is not None else np.full(n, np.nan)
        final = self.similarity_final if self.similarity_final is not None else np.full(n, np.nan)
        return [
            {
                "index": i,
                "similarity": _json_float(s),
                "similarity_generated": _json_float(g),
                "similarity_final": _json_float(f),
                "rank": int(r),
                "selected": i in chosen,
                "position": chosen.get(i),
            }
            for i, (s, g, f, r) in enumerate(zip(self.similarity.tolist(), gen.tolist(), final.tolist(),
                                                 self.rank.tolist()))
        ]


def _json_float(value: float) -> float | None:
    return None if not math.isfinite(float(value)) else round(float(value), 6)


def portrait_request(user_id: str | PortraitRequest, **fields: Any) -> dict[str, np.ndarray]:
    """``portrait`` inputs: a :class:`facetron.request.PortraitRequest` (the
    object the server parses too, with the same checks, errors naming the
    argument), or its fields. ``None`` leaves an optional input to the server's
    default; ``num_images`` defaults to the client's CLIENT_NUM_IMAGES."""
    if isinstance(user_id, PortraitRequest):
        if fields:
            raise InvalidInputError(next(iter(fields)), "give either a PortraitRequest or its fields, not both")
        return user_id.to_arrays()
    fields.setdefault("num_images", CLIENT_NUM_IMAGES)
    return PortraitRequest(user_id=user_id, **fields).to_arrays()


def portrait_result(out: Mapping[str, np.ndarray], info: CallInfo) -> PortraitResult:
    raw = out["report"].reshape(-1)
    text = raw[0] if raw.size else b"{}"
    text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
    try:
        report = json.loads(text) if text else {}
    except json.JSONDecodeError:
        report = {"raw": text}
    if not isinstance(report, dict):
        report = {"value": report}
    return PortraitResult(
        images=out["images"],
        similarity=out["similarity"].reshape(-1),
        rank=out["rank"].reshape(-1),
        selected=out["selected"].reshape(-1),
        report=report,
        timing={"server": info.server, "attempts": info.attempts, "client_total_s": round(info.elapsed_s, 4)},
        similarity_generated=out["similarity_generated"].reshape(-1) if "similarity_generated" in out else None,
        similarity_final=out["similarity_final"].reshape(-1) if "similarity_final" in out else None,
    )
