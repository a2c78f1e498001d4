"""The ``face_select`` model: rank candidate portraits by identity.

``select_portraits`` is its logic with the detector and embedder passed in
as functions: inside Triton they are BLS calls to ``face_detector`` /
``face_embedder`` (:mod:`facetron.triton.bls`); in-process (tests,
benchmarks, the CLI) they are the local models. Same code, so "Triton vs
in-process" compares transport only."""

from __future__ import annotations

import numpy as np

from facetron import metrics
from facetron.contract import FaceSelectParams
from facetron.errors import InvalidInputError
from facetron.pipeline.net_io import check_request_pixels
from facetron.pipeline.selection import (
    select_portraits,
    select_rules,
    selection_outputs,
)
from facetron.triton import bls
from facetron.triton.backend import (
    get_input,
    get_scalar,
    get_string,
    handle_each,
    pb,
    read_params,
    user_token,
)
from facetron.users import served_registry, validate_user_id


class FaceSelectModel:
    def initialize(self, args):
        params = read_params(args, FaceSelectParams)
        self.rules = select_rules(params)
        self.users = served_registry(params.users_dir)
        self.logger = pb().Logger
        metrics.install(args["model_name"])

    def _reference(self, request):
        ref = get_input(request, "reference_embedding", required=False)
        user = get_string(request, "user_id", required=False)
        if ref is not None and user is not None:
            raise InvalidInputError("reference_embedding", "give either reference_embedding or user_id, not both")
        if ref is not None:
            return ref
        if user is None:
            raise InvalidInputError("reference_embedding", "one of reference_embedding or user_id is required")
        return self.users.reference_embedding(validate_user_id(user), user_token(request))  # the caller's own

    def _select(self, request):
        images = check_request_pixels(get_input(request, "images", dtype=np.uint8, ndim=4))  # before any work
        reference = self._reference(request)
        top_k = int(get_scalar(request, "top_k", np.int32, default=0))
        selection, _ = select_portraits(images, reference, top_k, bls.detect, bls.embed, self.rules)
        return selection_outputs(images, selection)

    def execute(self, requests):
        return handle_each(requests, self._select, self.logger)

    def finalize(self):
        self.users = None
        metrics.uninstall()
