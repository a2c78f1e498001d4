"""The ``face_detector`` model: images UINT8[N,H,W,3] -> MTCNN faces.

The cascade (pyramid, NMS, regression) runs here in numpy. The three nets
run in ONNX Runtime in this process (``nets: onnxruntime``, cpu target) or
as the ``mtcnn_pnet/rnet/onet`` models of the same server over BLS
(``nets: bls``, gpu target, where those run on a native backend)."""

from __future__ import annotations

import numpy as np

from facetron import contract
from facetron.contract import FaceDetectorParams
from facetron.faces.detector import DetectorConfig, FaceDetector
from facetron.pipeline.net_io import check_detect_images, pack_detections
from facetron.triton.backend import bls_infer, get_input, handle_each, pb, read_params

MTCNN_NETS = {"pnet": contract.MTCNN_PNET, "rnet": contract.MTCNN_RNET, "onet": contract.MTCNN_ONET}






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
