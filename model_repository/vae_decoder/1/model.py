"""Triton python-backend model: latent FP32[N,4,h,w] -> images UINT8[N,8h,8w,3] (ONNX Runtime)."""

import numpy as np

from facetron.serving.ort_net import open_session, require, run_batched, version_dir
from facetron.serving.triton_utils import model_parameters, pb


class TritonPythonModel:
    def initialize(self, args):
        threads = int(model_parameters(args).get("intra_op_threads") or 0) or None
        self.session = open_session(version_dir(args) / "model.onnx", threads)

    def _read(self, request):
        t = pb().get_input_tensor_by_name(request, "latent")
        return {"latent": require(t.as_numpy() if t else None, "latent", np.float32, 4)}

    def _run(self, feed):
        return {"images": self.session.run(["images"], feed)[0]}

    def execute(self, requests):
        return run_batched(requests, self._read, self._run)
