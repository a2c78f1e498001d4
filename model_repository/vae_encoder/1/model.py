"""Triton python-backend model: images UINT8[N,H,W,3] -> scaled latent mean (ONNX Runtime)."""

import numpy as np

from facetron.serving.ort_net import open_session, require, run_batched, version_dir
from facetron.serving.triton_utils import model_parameters, pb


class TritonPythonModel:
    def initialize(self, args):
        threads = int(model_parameters(args).get("intra_op_threads") or 0) or None
        self.session = open_session(version_dir(args) / "model.onnx", threads)

    def _read(self, request):
        t = pb().get_input_tensor_by_name(request, "images")
        return {"images": require(t.as_numpy() if t else None, "images", np.uint8, 4)}

    def _run(self, feed):
        return {"latent": self.session.run(["latent"], feed)[0]}

    def execute(self, requests):
        return run_batched(requests, self._read, self._run)
