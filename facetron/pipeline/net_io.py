"""What the served nets take and give, checked before any work: feeds
against the graph's own dims and dtypes, value rules per net (token ids,
latent sides, prompts, detector images), the detector's packed outputs,
the embedder's normalised vectors, and which graph file the ``unet`` runs.

Triton-free: the served models (:mod:`facetron.serving`) and in-process
callers (tests, benchmarks, export) share these rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from facetron import contract
from facetron.contract import INT8_FOLDER, INT8_MODES, MODEL_FILE, UnetParams
from facetron.errors import InvalidInputError
from facetron.request import decode_utf8



def unet_graph(folder: Path, params: UnetParams) -> Path:
    """The graph the ``unet`` model runs: ``model.onnx``, or with ``int8`` on (OpenVINO) the int8 IR
    ``<folder>/int8/model.xml`` the assembler wrote (its ``quantization.json`` says how it was made and
    how far it deviates)."""
    check_int8(params.int8)
    if params.int8 == "off":
        return folder / MODEL_FILE
    ir = folder / INT8_FOLDER / "model.xml"
    if params.runtime != "openvino" or not ir.is_file():
        raise InvalidInputError("parameter int8", f"{params.int8!r} needs runtime openvino and {ir} "
                                                  "(`export repository --int8`)")
    return ir


def check_int8(mode: str, name: str = "int8") -> str:
    if mode not in INT8_MODES:
        raise InvalidInputError(name, f"expected one of {', '.join(INT8_MODES)}, got {mode!r}")
    return mode


_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8,
               "tensor(int64)": np.int64}


def check_feed(feed: dict[str, np.ndarray], session) -> dict[str, np.ndarray]:
    """What the graph itself needs beyond the config: dtype, rank and every
    fixed dimension (channels, hidden size) of each input the session takes
    (an ONNX Runtime session or any runtime of :mod:`.runtimes`)."""
    for spec in session.get_inputs():
        arr = feed.get(spec.name)
        if arr is None:
            continue
        want = _ORT_DTYPES.get(spec.type)
        if want is not None and arr.dtype != np.dtype(want):
            raise InvalidInputError(spec.name, f"expected dtype {np.dtype(want)}, got {arr.dtype}")
        if arr.ndim != len(spec.shape):
            raise InvalidInputError(spec.name, f"expected {len(spec.shape)} dimensions, got shape {list(arr.shape)}")
        for axis, (dim, got) in enumerate(zip(spec.shape, arr.shape)):
            if isinstance(dim, int) and dim != got:
                raise InvalidInputError(spec.name, f"dimension {axis} must be {dim} for this model, got shape "
                                                   f"{list(arr.shape)}")
    return feed


def check_finite(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InvalidInputError(name, "holds NaN or infinite values")
    return arr


def check_min_side(arr: np.ndarray, name: str, minimum: int, axes: tuple[int, int], multiple: int = 1) -> np.ndarray:
    h, w = arr.shape[axes[0]], arr.shape[axes[1]]
    if min(h, w) < minimum or h % multiple or w % multiple:
        rule = f"at least {minimum}" + (f" and a multiple of {multiple}" if multiple > 1 else "")
        raise InvalidInputError(name, f"sides must be {rule}, got {w}x{h}")
    return arr


def check_token_ids(ids: np.ndarray, name: str = "input_ids") -> np.ndarray:
    if ids.size and (ids.min() < 0 or ids.max() >= contract.VOCAB_SIZE):
        raise InvalidInputError(name, f"token ids must be in 0..{contract.VOCAB_SIZE - 1}, got {ids.min()}..{ids.max()}")
    return ids


#: per net: the value checks its graph needs (shapes are checked by check_feed)
NET_CHECKS = {
    "text_encoder": check_token_ids,
    "vae_decoder": lambda a, n: check_min_side(check_finite(a, n), n, 1, (2, 3)),
    "vae_encoder": lambda a, n: check_min_side(a, n, 4 * contract.LATENT_FACTOR, (1, 2), contract.LATENT_FACTOR),
}


def check_prompts(raw: np.ndarray, name: str = "prompt") -> list[str]:
    """The prompts of a request as text, each rule naming the input."""
    if raw.ndim != 1:
        raise InvalidInputError(name, f"expected shape [N], got {list(raw.shape)}")
    if raw.shape[0] == 0:
        raise InvalidInputError(name, "expected at least one prompt, got N=0")
    if raw.shape[0] > contract.MAX_PROMPTS:
        raise InvalidInputError(name, f"at most {contract.MAX_PROMPTS} prompts per request, got {raw.shape[0]}")
    texts = []
    for i, item in enumerate(raw):
        data = item if isinstance(item, bytes) else str(item).encode()
        if len(data) > contract.MAX_PROMPT_BYTES:
            raise InvalidInputError(f"{name}[{i}]", f"longer than {contract.MAX_PROMPT_BYTES} bytes")
        texts.append(decode_utf8(data, f"{name}[{i}]"))
    return texts


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


def check_detect_images(images: np.ndarray, name: str = "images") -> np.ndarray:
    """RGB images whose sides MTCNN can scan (P-net's 12 px window) and that stay bounded."""
    h, w = images.shape[1:3]
    if images.shape[-1] != 3:
        raise InvalidInputError(name, f"expected RGB [N, H, W, 3], got shape {list(images.shape)}")
    if min(h, w) < contract.MIN_DETECT_SIDE or max(h, w) > contract.MAX_IMAGE_SIDE:
        raise InvalidInputError(name, f"sides must be {contract.MIN_DETECT_SIDE}..{contract.MAX_IMAGE_SIDE} px, got {w}x{h}")
    return images


def normalise(desc: np.ndarray) -> np.ndarray:
    """dlib descriptors -> L2-normalised embeddings (cosine similarity)."""
    return (desc / np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), 1e-12)).astype(np.float32)
