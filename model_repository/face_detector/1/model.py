"""Triton python-backend model: images UINT8[N,H,W,3] -> MTCNN faces."""

import numpy as np

from facetron.faces.detector import DetectorConfig, FaceDetector
from facetron.serving.faces import pack_detections
from facetron.serving.triton_utils import get_input, handle_each, model_parameters, pb


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        config = DetectorConfig(min_face_size=float(params.get("min_face_size") or 20))
        self.detector = FaceDetector(config, backend="onnx")
        self.detector.detect(np.zeros((64, 64, 3), np.uint8))  # export/load the nets now, not on the first call
        self.logger = pb().Logger

    def _detect(self, request):
        images = get_input(request, "images", dtype=np.uint8, ndim=4)
        return pack_detections(self.detector.detect_batch(list(images)))

    def execute(self, requests):
        return handle_each(requests, self._detect, self.logger)
