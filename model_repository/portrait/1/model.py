"""Triton python-backend (BLS) model: the one call a client makes.

portrait_generator -> fuse the user's template face -> face_select.
See facetron.serving.portrait_call."""

import json
from pathlib import Path

from facetron.serving.generator import request_arrays
from facetron.serving.portrait_call import GENERATOR_INPUTS, bls_detect, bls_select, run_portrait
from facetron.serving.triton_utils import bls_infer, handle_each, model_parameters, pb
from facetron.users import UserRegistry, default_root

ALL_INPUTS = GENERATOR_INPUTS + ("top_k", "fuse")


def _generate(inputs):
    return bls_infer("portrait_generator", inputs, ["images"])["images"]


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        self.registry = UserRegistry(Path(params.get("users_dir") or default_root()))
        info = Path(args["model_repository"]).parent / "portrait_generator" / "1" / "model_info.json"
        self.model_info = json.loads(info.read_text()) if info.is_file() else {}
        self.logger = pb().Logger

    def _portrait(self, request):
        inputs = request_arrays(request, ALL_INPUTS)
        return run_portrait(inputs, self.registry, _generate, bls_detect, bls_select, self.model_info)

    def execute(self, requests):
        return handle_each(requests, self._portrait, self.logger)
