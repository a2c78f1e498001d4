"""Triton python-backend (BLS) model: rank candidate portraits by identity."""

from pathlib import Path

import numpy as np

from facetron.errors import InvalidInputError
from facetron.faces.select import SelectRules
from facetron.serving.faces import select_portraits
from facetron.serving.triton_utils import bls_infer, get_input, get_scalar, get_string, handle_each, model_parameters, pb
from facetron.users import UserRegistry, default_root, validate_user_id

DETECTOR_OUTPUTS = ["boxes", "scores", "landmarks", "num_faces"]


def _detect(images):
    return bls_infer("face_detector", {"images": images}, DETECTOR_OUTPUTS)


def _embed(chips):
    out = []
    for start in range(0, len(chips), 64):  # face_embedder's max_batch_size
        out.append(bls_infer("face_embedder", {"faces": chips[start : start + 64]}, ["embeddings"])["embeddings"])
    return np.concatenate(out)


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        self.rules = SelectRules(
            min_face_frac=float(params.get("min_face_frac") or 0.08),
            max_face_frac=float(params.get("max_face_frac") or 0.95),
            min_score=float(params.get("min_score") or 0.9),
        )
        self.users = UserRegistry(Path(params["users_dir"]) if params.get("users_dir") else default_root())
        self.logger = pb().Logger

    def _reference(self, request):
        ref = get_input(request, "reference_embedding", required=False)
        user = get_string(request, "user_id", required=False)
        if ref is not None and user is not None:
            raise InvalidInputError("reference_embedding", "give either reference_embedding or user_id, not both")
        if ref is not None:
            return ref
        if user is None:
            raise InvalidInputError("reference_embedding", "one of reference_embedding or user_id is required")
        return self.users.reference_embedding(validate_user_id(user))

    def _select(self, request):
        images = get_input(request, "images", dtype=np.uint8, ndim=4)
        reference = self._reference(request)
        top_k = int(get_scalar(request, "top_k", np.int32, default=0))
        selection, _ = select_portraits(images, reference, top_k, _detect, _embed, self.rules)
        return {
            "images": np.ascontiguousarray(images[selection.order]),
            "similarity": selection.similarity,
            "rank": selection.rank,
            "selected": selection.order,
        }

    def execute(self, requests):
        return handle_each(requests, self._select, self.logger)
