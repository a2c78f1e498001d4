"""Triton python-backend model: one user's merged UNet (serving mode 1).

FaceChain's way: the user's face (+ style) LoRA fused into the UNet weights,
one model per user (``unet_user_<id>``, written by ``facetron export
add-user``), loaded on demand with explicit model control. The scalable
default is the runtime-LoRA ``unet``; this mode suits few users."""

from facetron.serving.ort_net import open_session, run_batched, unet_feed, version_dir
from facetron.serving.triton_utils import model_parameters, pb


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        threads = int(params.get("intra_op_threads") or 0) or None
        self.session = open_session(version_dir(args) / "model.onnx", threads, params.get("providers") or "cpu")

    def _read(self, request):
        return unet_feed(request)

    def _run(self, feed):
        return {"noise_pred": self.session.run(["noise_pred"], feed)[0]}

    def execute(self, requests):
        return run_batched(requests, self._read, self._run)
