"""Triton python-backend model: one user's merged UNet (serving mode 1).

FaceChain's way: the user's face (+ style) LoRA fused into the UNet weights,
one model per user (``unet_user_<id>``, written by ``facetron export
add-user``), loaded on demand with explicit model control. The scalable
default is the runtime-LoRA ``unet``; this mode suits few users."""

import numpy as np

from facetron.errors import InvalidInputError
from facetron.serving.ort_net import open_session, require, run_batched, version_dir
from facetron.serving.triton_utils import model_parameters, pb


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        threads = int(params.get("intra_op_threads") or 0) or None
        self.session = open_session(version_dir(args) / "model.onnx", threads, params.get("providers") or "cpu")

    def _read(self, request):
        get = pb().get_input_tensor_by_name
        sample = require(get(request, "sample").as_numpy(), "sample", np.float32, 4)
        n = sample.shape[0]
        t = get(request, "timestep").as_numpy()
        if t.dtype != np.float32 or t.size != n:
            raise InvalidInputError("timestep", f"expected FP32 with one value per batch item ({n}), got {t.dtype} {list(t.shape)}")
        hidden = require(get(request, "encoder_hidden_states").as_numpy(), "encoder_hidden_states", np.float32, 3)
        return {"sample": sample, "timestep": t.reshape(n), "encoder_hidden_states": hidden}

    def _run(self, feed):
        return {"noise_pred": self.session.run(["noise_pred"], feed)[0]}

    def execute(self, requests):
        return run_batched(requests, self._read, self._run)
