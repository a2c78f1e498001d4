"""Face detection: MTCNN (facenet-pytorch weights) behind a small numpy API.

``FaceDetector().detect(rgb_uint8)`` returns boxes, scores and 5 landmarks.
The nets run in ONNX Runtime by default (exported once from the shipped
weights into the facetron cache) or in PyTorch; the cascade around them is
numpy/cv2 (:mod:`facetron.faces.mtcnn_cascade`).
"""

from __future__ import annotations

import gc
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from facetron.assets import asset_path
from facetron.contract import MIN_FACE_SCORE
from facetron.errors import InvalidInputError
from facetron.faces.mtcnn_cascade import CascadeParams, NetFn, run_cascade
from facetron.imageio import check_rgb_array
from facetron.paths import cache_dir

# torch (facetron.faces.mtcnn_nets) is imported lazily: the ONNX backend needs
# it only for the one-time export, so a warm cache serves without it.

Backend = Literal["onnx", "torch"]
_NET_NAMES = ("pnet", "rnet", "onet")
#: Memory given back after a request of more than this many pixels (all images): the P/R/O-net arenas
#: shrink after every call (facetron.net_runtimes.ORT_MEMORY) and the C heap is trimmed (release_heap).
#: Measured (tiny box, 2 shared cores), one 4096x4096 image, PSS idle 82 MB -> after: 193 MB shrinking
#: every call (96 trimmed), 372 MB shrinking only calls over 1 Mi input elements (the arena's power-of-two
#: regions kept), ~1.8 GB with the plain arena after 4 x 3000x3000. Cost of shrinking every call: a 1024x768
#: photo ~as fast, a 2048x1536 one up to ~20 % slower (its first pyramid levels refault their memory).
TRIM_ABOVE_PIXELS = 1 << 22
_EXPORT_VERSION = b"mtcnn-onnx-v1"  # bump when export_mtcnn_onnx changes its output


@dataclass(frozen=True)
class DetectorConfig(CascadeParams):
    """MTCNN settings: the cascade's (:class:`CascadeParams`, facenet-pytorch's
    defaults) and two of this detector's own.

    ``max_side``: inputs whose longer side exceeds it are downscaled (cv2
    INTER_AREA) to that side before the pyramid, and the results scaled back.
    It bounds time and memory on very large photos (the first pyramid level
    of an 8192 px image would otherwise be ~4900 px); the price is that the
    smallest detectable face grows to ``min_face_size * long_side / max_side``
    original pixels. ``None`` disables it. Inputs up to ``max_side`` are
    processed exactly like facenet-pytorch.

    ``min_score``: final floor on the ONet score. facenet-pytorch has none
    (its ONet threshold is 0.7); with ``min_score=0`` the output is exactly
    facenet-pytorch's. The default (``contract.MIN_FACE_SCORE``, 0.9) drops
    MTCNN's confident-looking false positives (a hand at 0.87 and a glass at
    0.86 in insightface's t1.jpg, where the six real faces score >= 0.97):
    this project prefers precision.
    """

    max_side: int | None = 2048
    min_score: float = MIN_FACE_SCORE


@dataclass
class Detections:
    """Faces in one image, highest score first.

    ``boxes`` float32 [K, 4] (x1, y1, x2, y2) pixels, not clipped to the image;
    ``scores`` float32 [K]; ``landmarks`` float32 [K, 5, 2] (x, y) for left eye,
    right eye (image-left first), nose, mouth left, mouth right.
    """

    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    landmarks: np.ndarray = field(default_factory=lambda: np.zeros((0, 5, 2), np.float32))

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def weights_digest() -> str:
    """sha256 over the three MTCNN weight files and the export version (keys the ONNX cache)."""
    h = hashlib.sha256(_EXPORT_VERSION)
    for name in _NET_NAMES:
        h.update(name.encode())
        h.update(asset_path(f"mtcnn_{name}").read_bytes())
    return h.hexdigest()


def mtcnn_onnx_paths() -> dict[str, Path]:
    """ONNX files of the three nets, exported on first use into the facetron cache."""
    folder = cache_dir("onnx", f"mtcnn-{weights_digest()[:12]}")
    paths = {name: folder / f"{name}.onnx" for name in _NET_NAMES}
    if not all(p.is_file() for p in paths.values()):
        from facetron.faces.mtcnn_nets import export_mtcnn_onnx

        paths = export_mtcnn_onnx(folder)
    return paths


def _onnx_runners() -> tuple[NetFn, NetFn, NetFn]:
    # Idle ORT threads do not spin (ort_session): the numpy cascade runs between
    # net calls on the same (few) cores. Each call gives its arena memory back
    # when it ends (TRIM_ABOVE_PIXELS, facetron.net_runtimes.ORT_MEMORY).
    from facetron.net_runtimes import ort_run_options, ort_session

    shrink = ort_run_options("shrink")
    runners = []
    for path in mtcnn_onnx_paths().values():
        sess = ort_session(path, memory="shrink")
        runners.append(lambda x, s=sess: s.run(None, {"images": x}, shrink))  # mtcnn_nets.ONNX_INPUT
    return tuple(runners)


def _torch_runners() -> tuple[NetFn, NetFn, NetFn]:
    import torch

    from facetron.faces.mtcnn_nets import load_mtcnn_nets

    def wrap(net: torch.nn.Module) -> NetFn:
        def run(x: np.ndarray) -> list[np.ndarray]:
            with torch.inference_mode():
                return [t.numpy() for t in net(torch.from_numpy(x))]

        return run

    return tuple(wrap(net) for net in load_mtcnn_nets())


class FaceDetector:
    """MTCNN face detector over RGB uint8 arrays (see :class:`Detections`)."""

    def __init__(
        self,
        config: DetectorConfig | None = None,
        backend: Backend = "onnx",
        runners: tuple[NetFn, NetFn, NetFn] | None = None,
    ) -> None:
        """``runners`` replaces the nets with three callables (P, R, O) taking the
        normalised NCHW float32 batch and returning the nets' outputs in
        ``mtcnn_nets.ONNX_OUTPUTS`` order — e.g. BLS calls to Triton models."""
        if backend not in ("onnx", "torch"):
            raise InvalidInputError("backend", f"expected 'onnx' or 'torch', got {backend!r}")
        self.config = config or DetectorConfig()
        self.backend = backend
        self._nets: tuple[NetFn, NetFn, NetFn] | None = runners

    def _runners(self) -> tuple[NetFn, NetFn, NetFn]:
        if self._nets is None:
            self._nets = _onnx_runners() if self.backend == "onnx" else _torch_runners()
        return self._nets

    def _prepare(self, image: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray | None]:
        """Validate; downscale past max_side. Returns the image and the (sx, sy) factor back, if any."""
        check_rgb_array(image, name)
        limit = self.config.max_side
        h, w = image.shape[:2]
        if limit is None or max(h, w) <= limit:
            return image, None
        s = limit / max(h, w)
        size = (max(1, round(w * s)), max(1, round(h * s)))
        small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        return small, np.array([w / size[0], h / size[1]], np.float32)

    def _detect_many(self, images: list[np.ndarray], names: list[str]) -> list[Detections]:
        prepared = [self._prepare(img, n) for img, n in zip(images, names)]
        if not prepared:
            return []
        pnet, rnet, onet = self._runners()
        raw = run_cascade([p[0] for p in prepared], pnet, rnet, onet, self.config)
        out = []
        for (boxes, scores, marks), (_, back) in zip(raw, prepared):
            keep = scores >= np.float32(self.config.min_score)
            boxes, scores, marks = boxes[keep], scores[keep], marks[keep]
            if back is not None:
                boxes = boxes * np.tile(back, 2)
                marks = marks * back
            out.append(Detections(boxes=boxes, scores=scores, landmarks=marks))
        if sum(img.shape[0] * img.shape[1] for img in images) > TRIM_ABOVE_PIXELS:
            from facetron.net_runtimes import release_heap

            del raw, prepared
            gc.collect()  # arrays held in cycles (frames of the cascade) before the heap is trimmed
            release_heap()
        return out

    def detect(self, image: np.ndarray) -> Detections:
        """Faces in one RGB uint8 [H, W, 3] image; zero faces gives K=0 arrays."""
        return self._detect_many([image], ["image"])[0]

    def detect_batch(self, images: list[np.ndarray]) -> list[Detections]:
        """Faces in each image (sizes may differ; same-size images share PNet calls)."""
        if not isinstance(images, (list, tuple)):
            raise InvalidInputError("images", f"expected a list of arrays, got {type(images).__name__}")
        return self._detect_many(list(images), [f"images[{i}]" for i in range(len(images))])
