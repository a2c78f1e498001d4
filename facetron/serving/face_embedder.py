"""The ``face_embedder`` model: faces UINT8[N,150,150,3] -> embeddings, descriptors.

All requests of a dynamic batch run as one ONNX Runtime call."""

from __future__ import annotations

import numpy as np

from facetron.contract import CHIP_SIZE, FaceEmbedderParams
from facetron.faces.embedder import FaceEmbedder, check_chips
from facetron.pipeline.net_io import normalise
from facetron.triton.backend import error_response, get_input, read_params, response


class FaceEmbedderModel:
    def initialize(self, args):
        params = read_params(args, FaceEmbedderParams)
        self.embedder = FaceEmbedder(intra_op_num_threads=params.intra_op_threads or None)
        self.embedder.descriptors(np.zeros((1, CHIP_SIZE, CHIP_SIZE, 3), np.uint8))  # warm up

    def execute(self, requests):
        responses: list = [None] * len(requests)
        chips, owners = [], []
        for i, request in enumerate(requests):
            try:
                faces = check_chips(get_input(request, "faces", dtype=np.uint8, ndim=4), "faces")
                chips.append(faces)
                owners.append((i, len(faces)))
            except Exception as exc:  # noqa: BLE001
                responses[i] = error_response(exc)
        if chips:
            desc = self.embedder.descriptors(np.concatenate(chips)).astype(np.float32)
            norm = normalise(desc)
            start = 0
            for i, n in owners:
                responses[i] = response({"embeddings": norm[start : start + n], "descriptors": desc[start : start + n]})
                start += n
        return responses

    def finalize(self):
        self.embedder = None
