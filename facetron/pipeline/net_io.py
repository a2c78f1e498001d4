"""What the served nets take and give, checked before any work: feeds
against the graph's own dims and dtypes, value rules per net (token ids,
latent sides, prompts, detector images), the detector's packed outputs,
the embedder's normalised vectors, which graph file the ``unet`` runs, and
the ControlNet's tensors (its conditioning image and scale, the residuals the
``unet`` takes: :func:`check_control_inputs`, :func:`check_residuals`).

Triton-free: the served models (:mod:`facetron.serving`) and in-process
callers (tests, benchmarks, export) share these rules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from facetron import contract
from facetron.contract import CONTROL_LAYOUT, INT8_FOLDER, INT8_MODES, MODEL_FILE, UnetParams
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


def latent_cells(arr: np.ndarray, axes: tuple[int, int], factor: int = 1) -> int:
    """Latent cells of a batch: items x the two side ``axes`` (pixels when ``factor`` is LATENT_FACTOR)."""
    return arr.shape[0] * (arr.shape[axes[0]] // factor) * (arr.shape[axes[1]] // factor)


def check_net_budget(arr: np.ndarray, name: str, axes: tuple[int, int], max_side: int, max_cells: int,
                     factor: int = 1, max_item_cells: int | None = None) -> np.ndarray:
    """A net call's size: each side at most ``max_side``, each item at most ``max_item_cells`` and the
    batch at most ``max_cells`` latent cells (``factor``: pixels per latent cell along a side, for
    images). Shapes only: checked before any work."""
    h, w = arr.shape[axes[0]], arr.shape[axes[1]]
    unit = "px" if factor > 1 else "latent cells"
    if max(h, w) > max_side:
        raise InvalidInputError(name, f"sides must be at most {max_side} {unit} per call, got {w}x{h}")
    item = (h // factor) * (w // factor)
    if max_item_cells is not None and item > max_item_cells:
        raise InvalidInputError(name, f"{w}x{h} {unit} is {item} latent cells per item, over the limit of "
                                      f"{max_item_cells} (self-attention memory grows with their square)")
    cells = latent_cells(arr, axes, factor)
    if cells > max_cells:
        what = f"{arr.shape[0]} x {w}x{h} {unit}"
        raise InvalidInputError(name, f"{what} is {cells} latent cells, over the limit of {max_cells} "
                                      f"latent cells per call")
    return arr


def check_sample(sample: np.ndarray, name: str = "sample") -> np.ndarray:
    """A UNet sample [N, 4, h, w]: sides MIN_LATENT_SIDE..MAX_LATENT_SIDE, N*h*w <= UNET_MAX_BATCH_CELLS."""
    check_net_budget(sample, name, (2, 3), contract.MAX_LATENT_SIDE, contract.UNET_MAX_BATCH_CELLS)
    return check_min_side(sample, name, contract.MIN_LATENT_SIDE, (2, 3))


def read_down_factor(folder: Path) -> int:
    """The UNet down factor a graph folder's ``io.json`` records (:data:`facetron.contract.UNET_DOWN_FACTOR`, written
    at export); a folder exported before it was recorded: :data:`~facetron.contract.DEFAULT_UNET_DOWN_FACTOR`."""
    path = Path(folder) / contract.IO_FILE
    factor = json.loads(path.read_text()).get(contract.UNET_DOWN_FACTOR) if path.is_file() else None
    return int(factor or contract.DEFAULT_UNET_DOWN_FACTOR)


def check_sample_sides(sample: np.ndarray, down_factor: int, name: str = "sample") -> np.ndarray:
    """A UNet sample [N, C, h, w] whose sides this UNet's graph can run: multiples of its ``down_factor`` (the
    skip connections concatenate at fixed halvings; diffusers' forward_upsample_size is not in the graph)."""
    h, w = sample.shape[2:]
    if h % down_factor or w % down_factor:
        raise InvalidInputError(name, f"sides must be multiples of {down_factor} latent cells for this UNet (its down "
                                      f"factor), got {w}x{h}")
    return sample


def check_latent(latent: np.ndarray, name: str = "latent") -> np.ndarray:
    """A VAE latent [N, 4, h, w]: sides 1..MAX_LATENT_SIDE, h*w <= VAE_MAX_ITEM_CELLS, N*h*w <=
    VAE_MAX_BATCH_CELLS, finite."""
    check_net_budget(latent, name, (2, 3), contract.MAX_LATENT_SIDE, contract.VAE_MAX_BATCH_CELLS,
                     max_item_cells=contract.VAE_MAX_ITEM_CELLS)
    return check_min_side(check_finite(latent, name), name, 1, (2, 3))


def check_vae_images(images: np.ndarray, name: str = "images") -> np.ndarray:
    """VAE encoder images [N, H, W, 3]: sides multiples of LATENT_FACTOR in 32..MAX_SIDE px, at most
    VAE_MAX_ITEM_CELLS per image and VAE_MAX_BATCH_CELLS per call (latent cells: x LATENT_FACTOR^2 pixels)."""
    check_net_budget(images, name, (1, 2), contract.MAX_SIDE, contract.VAE_MAX_BATCH_CELLS, contract.LATENT_FACTOR,
                     max_item_cells=contract.VAE_MAX_ITEM_CELLS)
    return check_min_side(images, name, 4 * contract.LATENT_FACTOR, (1, 2), contract.LATENT_FACTOR)


#: per net: the value checks its graph needs (shapes are checked by check_feed)
NET_CHECKS = {
    "text_encoder": check_token_ids,
    "vae_decoder": check_latent,
    "vae_encoder": check_vae_images,
    "vae_decoder_tiny": check_latent,  # the tiny autoencoder: the full VAEs' tensors and rules
    "vae_encoder_tiny": check_vae_images,
}
#: per net: (latent cells of a feed, the most one call may run): run_batched splits a dynamic batch over it
_VAE_DECODER_BUDGET = (lambda feed: latent_cells(feed["latent"], (2, 3)), contract.VAE_MAX_BATCH_CELLS)
_VAE_ENCODER_BUDGET = (lambda feed: latent_cells(feed["images"], (1, 2), contract.LATENT_FACTOR),
                       contract.VAE_MAX_BATCH_CELLS)
_UNET_BUDGET = (lambda feed: latent_cells(feed["sample"], (2, 3)), contract.UNET_MAX_BATCH_CELLS)
NET_BUDGETS = {
    "unet": _UNET_BUDGET,
    "controlnet": _UNET_BUDGET,  # the ControlNet runs the UNet's down path on the same samples: the unet's budget
    "vae_decoder": _VAE_DECODER_BUDGET,
    "vae_encoder": _VAE_ENCODER_BUDGET,
    "vae_decoder_tiny": _VAE_DECODER_BUDGET,  # the tiny autoencoder: the full VAEs' budgets
    "vae_encoder_tiny": _VAE_ENCODER_BUDGET,
}


def read_control_layout(folder: Path) -> dict:
    """A ControlNet graph folder's residual layout (:data:`facetron.contract.CONTROL_LAYOUT`): per residual its
    name, channels and pixels-per-cell factor of the sample; the conditioning image's pixels per latent cell."""
    return json.loads((Path(folder) / CONTROL_LAYOUT).read_text())


def check_control_inputs(cond: np.ndarray, scale: np.ndarray | None, sample: np.ndarray, cond_factor: int
                         ) -> tuple[np.ndarray, np.ndarray]:
    """The ``controlnet``'s conditioning image FP32 [N, 3, f*h, f*w] in [0, 1] (``sample`` [N, C, h, w] is within
    its budget: so is the image) and ``conditioning_scale`` FP32, one per item in [0, MAX_CONTROL_SCALE];
    returns (image, scale [N])."""
    n, (h, w) = sample.shape[0], sample.shape[2:]
    want = (n, 3, cond_factor * h, cond_factor * w)
    if cond.shape != want:
        raise InvalidInputError("controlnet_cond", f"expected {list(want)} (3 channels at {cond_factor} px per "
                                                   f"latent cell of the sample), got {list(cond.shape)}")
    check_finite(cond, "controlnet_cond")
    if cond.size and (cond.min() < 0.0 or cond.max() > 1.0):
        raise InvalidInputError("controlnet_cond", f"values must be in [0, 1], got {cond.min():g}..{cond.max():g}")
    if scale is None or scale.dtype != np.float32 or scale.size != n:
        got = "nothing" if scale is None else f"{scale.dtype} {list(scale.shape)}"
        raise InvalidInputError("conditioning_scale", f"expected FP32 with one value per batch item ({n}), got {got}")
    scale = check_finite(scale.reshape(n), "conditioning_scale")
    if scale.size and (scale.min() < 0.0 or scale.max() > contract.MAX_CONTROL_SCALE):
        raise InvalidInputError("conditioning_scale", f"values must be in [0, {contract.MAX_CONTROL_SCALE:g}], got "
                                                      f"{scale.min():g}..{scale.max():g}")
    return cond, scale


def check_residuals(given: dict[str, np.ndarray], sample: np.ndarray, layout: dict) -> dict[str, np.ndarray]:
    """The ControlNet residuals a ``unet`` request sends: exactly the layout's names (the control graph's), each
    FP32 [N, channels, ceil(h/f), ceil(w/f)] for ``sample`` [N, C, h, w] (so within the sample's budget), finite."""
    specs = {r["name"]: r for r in layout["residuals"]}
    for name in given:
        if name not in specs:
            raise InvalidInputError(name, f"this unet's ControlNet graph takes {len(specs)} residuals "
                                          f"({', '.join(specs)})")
    n, (h, w) = sample.shape[0], sample.shape[2:]
    for name, spec in specs.items():
        arr = given.get(name)
        if arr is None:
            raise InvalidInputError(name, "is required with the other ControlNet residuals (send all of "
                                          f"{', '.join(specs)})")
        f = spec["factor"]
        want = (n, spec["channels"], -(-h // f), -(-w // f))
        if arr.shape != want:
            raise InvalidInputError(name, f"expected {list(want)} for a sample of {w}x{h} latent cells, got "
                                          f"{list(arr.shape)}")
        check_finite(arr, name)
    return {name: given[name] for name in specs}


def check_prompts(raw: np.ndarray, name: str = "prompt") -> list[str]:
    """The prompts of a request as text, each rule naming the input."""
    if raw.ndim != 1:
        raise InvalidInputError(name, f"expected shape [N], got {list(raw.shape)}")
    if raw.shape[0] == 0:
        raise InvalidInputError(name, "expected at least one prompt, got N=0")
    if raw.shape[0] > contract.MAX_PROMPTS:
        raise InvalidInputError(name, f"at most {contract.MAX_PROMPTS} prompts per request, got {raw.shape[0]}")
    items = [item if isinstance(item, bytes) else str(item).encode() for item in raw]
    for i, data in enumerate(items):
        if len(data) > contract.MAX_PROMPT_BYTES:
            raise InvalidInputError(f"{name}[{i}]", f"longer than {contract.MAX_PROMPT_BYTES} bytes")
    total = sum(len(data) for data in items)
    if total > contract.MAX_TOKENIZER_REQUEST_BYTES:
        raise InvalidInputError(name, f"{total} bytes in all, over the limit of {contract.MAX_TOKENIZER_REQUEST_BYTES} "
                                      "bytes per request")
    return [decode_utf8(data, f"{name}[{i}]") for i, data in enumerate(items)]


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


def check_request_pixels(images: np.ndarray, name: str = "images") -> np.ndarray:
    """Images [N, H, W, 3] of one request: each side at most MAX_IMAGE_SIDE, N*H*W at most MAX_REQUEST_PIXELS."""
    n, h, w = images.shape[:3]
    if max(h, w) > contract.MAX_IMAGE_SIDE:
        raise InvalidInputError(name, f"sides must be at most {contract.MAX_IMAGE_SIDE} px, got {w}x{h}")
    if n * h * w > contract.MAX_REQUEST_PIXELS:
        raise InvalidInputError(name, f"{n} x {w}x{h} px is {n * h * w} pixels, over the limit of "
                                      f"{contract.MAX_REQUEST_PIXELS} pixels per request")
    return images


def check_detect_images(images: np.ndarray, name: str = "images") -> np.ndarray:
    """RGB images whose sides MTCNN can scan (P-net's 12 px window) and that stay bounded (per image and
    per request)."""
    h, w = images.shape[1:3]
    if images.shape[-1] != 3:
        raise InvalidInputError(name, f"expected RGB [N, H, W, 3], got shape {list(images.shape)}")
    check_request_pixels(images, name)
    if min(h, w) < contract.MIN_DETECT_SIDE:
        raise InvalidInputError(name, f"sides must be {contract.MIN_DETECT_SIDE}..{contract.MAX_IMAGE_SIDE} px, got {w}x{h}")
    return images


def normalise(desc: np.ndarray) -> np.ndarray:
    """dlib descriptors -> L2-normalised embeddings (cosine similarity)."""
    return (desc / np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), 1e-12)).astype(np.float32)
