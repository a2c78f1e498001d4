"""The ``portrait_generator`` model: images for a user, no fusion, no ranking.

tokenizer -> text_encoder -> denoising loop over the runtime-LoRA unet (or
the user's merged ``unet_user_<id>``, ``unet_fewstep`` for a few-step
scheduler, and in template mode ``unet_inpaint`` where the repository serves
an inpainting UNet: the job's ``unet`` / ``unet_in_channels``) -> vae_decoder,
plus vae_encoder and face_detector in template mode: all BLS calls to models
of the same server, driven by :mod:`facetron.pipeline.generation`."""

from __future__ import annotations

from facetron import contract, metrics
from facetron.request import GeneratorRequest
from facetron.triton.backend import cancel_check, handle_each, pb, typed_request, user_token
from facetron.triton.generator import ServedGenerator


class PortraitGeneratorModel:
    def initialize(self, args):
        self.generator = ServedGenerator.from_args(args)
        self.logger = pb().Logger
        metrics.install(args["model_name"])

    def _generate(self, request):
        generator = self.generator.acting_for(user_token(request))  # the caller's own user only
        job = generator.job(typed_request(request, GeneratorRequest))
        progress = cancel_check(request, contract.PORTRAIT_GENERATOR.name)
        return {"images": generator.images(job, generator.template(job), progress)}

    def execute(self, requests):
        return handle_each(requests, self._generate, self.logger)

    def finalize(self):
        self.generator = None
        metrics.uninstall()
