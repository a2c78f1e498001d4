"""Triton python-backend model: faces UINT8[N,150,150,3] -> embeddings, descriptors.

All requests of a dynamic batch run as one ONNX Runtime call."""

import numpy as np

from facetron.faces.embedder import FaceEmbedder, check_chips
from facetron.serving.triton_utils import error_response, get_input, model_parameters, pb


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        threads = int(params.get("intra_op_threads") or 0) or None
        self.embedder = FaceEmbedder(intra_op_num_threads=threads)
        self.embedder.descriptors(np.zeros((1, 150, 150, 3), np.uint8))  # warm up

    def execute(self, requests):
        pb_utils = pb()
        responses = [None] * len(requests)
        chips, owners = [], []
        for i, request in enumerate(requests):
            try:
                faces = check_chips(get_input(request, "faces", dtype=np.uint8, ndim=4), "faces")
                chips.append(faces)
                owners.append((i, len(faces)))
            except Exception as exc:  # noqa: BLE001
                responses[i] = error_response(exc)
        if chips:
            desc = self.embedder.descriptors(np.concatenate(chips))
            norm = desc / np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), 1e-12)
            start = 0
            for i, n in owners:
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("embeddings", norm[start : start + n].astype(np.float32)),
                        pb_utils.Tensor("descriptors", desc[start : start + n].astype(np.float32)),
                    ]
                )
                start += n
        return responses
