"""Triton python-backend model: input_ids INT32[N,77] -> last_hidden_state (ONNX Runtime)."""

import numpy as np

from facetron.serving.ort_net import open_session, require, run_batched, version_dir
from facetron.serving.triton_utils import model_parameters, pb


class TritonPythonModel:
    def initialize(self, args):
        threads = int(model_parameters(args).get("intra_op_threads") or 0) or None
        self.session = open_session(version_dir(args) / "model.onnx", threads)

    def _read(self, request):
        ids = pb().get_input_tensor_by_name(request, "input_ids")
        return {"input_ids": require(ids.as_numpy() if ids else None, "input_ids", np.int32, 2)}

    def _run(self, feed):
        return {"last_hidden_state": self.session.run(["last_hidden_state"], feed)[0]}

    def execute(self, requests):
        return run_batched(requests, self._read, self._run)
