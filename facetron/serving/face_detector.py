"""The ``face_detector`` model: images UINT8[N,H,W,3] -> MTCNN faces.

The cascade (pyramid, NMS, regression) runs here in numpy. The three nets
run in ONNX Runtime in this process (``nets: onnxruntime``, cpu target) or
as the ``mtcnn_pnet/rnet/onet`` models of the same server over BLS
(``nets: bls``, gpu target, where those run on a native backend)."""

from __future__ import annotations

import numpy as np

from facetron import contract
from facetron.contract import FaceDetectorParams
from facetron.errors import InvalidInputError
from facetron.faces.detector import DetectorConfig, FaceDetector
from facetron.serving.backend import bls_infer, get_input, handle_each, pb, read_params

MTCNN_NETS = {"pnet": contract.MTCNN_PNET, "rnet": contract.MTCNN_RNET, "onet": contract.MTCNN_ONET}


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


def _bls_net(net: str):
    c = MTCNN_NETS[net]
    outputs = c.output_names()

    def run(x):
        out = bls_infer(c.name, {"images": np.ascontiguousarray(x, dtype=np.float32)}, outputs)
        return [out[name] for name in outputs]

    return run


class FaceDetectorModel:
    def initialize(self, args):
        params = read_params(args, FaceDetectorParams)
        config = DetectorConfig(min_face_size=params.min_face_size)
        if params.nets == "bls":
            self.detector = FaceDetector(config, runners=tuple(_bls_net(n) for n in MTCNN_NETS))
        else:
            self.detector = FaceDetector(config, backend="onnx")
            self.detector.detect(np.zeros((64, 64, 3), np.uint8))  # export/load the nets now
        self.logger = pb().Logger

    def _detect(self, request):
        images = check_detect_images(get_input(request, "images", dtype=np.uint8, ndim=4))
        return pack_detections(self.detector.detect_batch(list(images)))

    def execute(self, requests):
        return handle_each(requests, self._detect, self.logger)

    def finalize(self):
        self.detector = None
