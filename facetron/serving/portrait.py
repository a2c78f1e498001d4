"""The ``portrait`` model: the one call a client makes (:mod:`facetron.pipeline.portrait`)."""

from __future__ import annotations

from facetron import contract, metrics
from facetron.pipeline.portrait import run_portrait
from facetron.request import PortraitRequest
from facetron.triton import bls
from facetron.triton.backend import cancel_check, handle_each, pb, typed_request, user_token
from facetron.triton.generator import ServedGenerator


class PortraitModel:
    def initialize(self, args):
        self.generator = ServedGenerator.from_args(args)
        self.logger = pb().Logger
        metrics.install(args["model_name"])

    def _portrait(self, request):
        progress = cancel_check(request, contract.PORTRAIT.name)  # stop between steps when the client gave up
        portrait = typed_request(request, PortraitRequest)  # parsed once
        generator = self.generator.acting_for(user_token(request))  # the caller's own user only
        return run_portrait(portrait, generator, progress, detect=bls.detect, embed=bls.embed,
                            rules=self.generator.rules)

    def execute(self, requests):
        return handle_each(requests, self._portrait, self.logger)

    def finalize(self):
        self.generator = None
        metrics.uninstall()
