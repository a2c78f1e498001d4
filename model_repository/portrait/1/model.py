"""Triton python-backend (BLS) model: the one call a client makes.

portrait_generator -> fuse the user's template face -> face_select.
See facetron.serving.portrait_call."""

import json
from pathlib import Path

import numpy as np

from facetron.serving.portrait_call import GENERATOR_INPUTS, run_portrait
from facetron.serving.triton_utils import bls_infer, handle_each, model_parameters, pb
from facetron.users import UserRegistry, default_root

DETECTOR_OUTPUTS = ["boxes", "scores", "landmarks", "num_faces"]
ALL_INPUTS = GENERATOR_INPUTS + ("top_k", "fuse")


def _generate(inputs):
    return bls_infer("portrait_generator", inputs, ["images"])["images"]


def _detect(images):
    return bls_infer("face_detector", {"images": np.ascontiguousarray(images)}, DETECTOR_OUTPUTS)


def _select(images, user_id, top_k):
    inputs = {
        "images": np.ascontiguousarray(images),
        "user_id": np.array([user_id.encode()], dtype=object),
        "top_k": np.array([top_k], np.int32),
    }
    return bls_infer("face_select", inputs, ["images", "similarity", "rank", "selected"])


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        self.registry = UserRegistry(Path(params.get("users_dir") or default_root()))
        info = Path(args["model_repository"]).parent / "portrait_generator" / "1" / "model_info.json"
        self.model_info = json.loads(info.read_text()) if info.is_file() else {}
        self.logger = pb().Logger

    def _portrait(self, request):
        inputs = {}
        for name in ALL_INPUTS:
            t = pb().get_input_tensor_by_name(request, name)
            if t is not None:
                inputs[name] = t.as_numpy()
        return run_portrait(inputs, self.registry, _generate, _detect, _select, self.model_info)

    def execute(self, requests):
        return handle_each(requests, self._portrait, self.logger)
