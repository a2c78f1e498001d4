"""Triton python-backend model: images UINT8[N,H,W,3] -> MTCNN faces.

The cascade (pyramid, NMS, regression) runs here in numpy. The three nets
run in ONNX Runtime in this process (``nets: onnxruntime``, cpu target) or
as the ``mtcnn_pnet/rnet/onet`` models of the same server over BLS
(``nets: bls``, gpu target, where those run on a native backend)."""

import numpy as np

from facetron.faces.detector import DetectorConfig, FaceDetector
from facetron.serving.faces import pack_detections
from facetron.serving.triton_utils import bls_infer, get_input, handle_each, model_parameters, pb

NET_OUTPUTS = {
    "pnet": ["offsets", "probs"],
    "rnet": ["offsets", "probs"],
    "onet": ["offsets", "landmarks", "probs"],
}


def _bls_runner(net):
    outputs = NET_OUTPUTS[net]

    def run(x):
        out = bls_infer(f"mtcnn_{net}", {"images": np.ascontiguousarray(x, dtype=np.float32)}, outputs)
        return [out[name] for name in outputs]

    return run


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        config = DetectorConfig(min_face_size=float(params.get("min_face_size") or 20))
        if params.get("nets") == "bls":
            runners = tuple(_bls_runner(n) for n in ("pnet", "rnet", "onet"))
            self.detector = FaceDetector(config, runners=runners)
        else:
            self.detector = FaceDetector(config, backend="onnx")
            self.detector.detect(np.zeros((64, 64, 3), np.uint8))  # export/load the nets now
        self.logger = pb().Logger

    def _detect(self, request):
        images = get_input(request, "images", dtype=np.uint8, ndim=4)
        return pack_detections(self.detector.detect_batch(list(images)))

    def execute(self, requests):
        return handle_each(requests, self._detect, self.logger)
