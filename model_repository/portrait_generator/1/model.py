"""Triton python-backend (BLS) model: portraits for a user.

tokenizer -> text_encoder -> denoising loop over the runtime-LoRA unet ->
vae_decoder (+ vae_encoder and face_detector in template mode), all BLS
calls to models of the same server. See facetron.serving.generator."""

from pathlib import Path

from facetron.serving.generator import bls_nets, build_job, read_model_info, read_portrait_inputs, run_job
from facetron.serving.ort_net import version_dir
from facetron.serving.portrait_call import bls_detect
from facetron.serving.triton_utils import handle_each, model_parameters, pb
from facetron.users import UserRegistry, default_root

class TritonPythonModel:
    def initialize(self, args):
        self.params = model_parameters(args)
        self.repository = Path(args["model_repository"]).parent
        self.info, self.scheduler_config = read_model_info(version_dir(args))
        self.registry = UserRegistry(Path(self.params.get("users_dir") or default_root()))
        self.logger = pb().Logger

    def _generate(self, request):
        job = build_job(
            read_portrait_inputs(request),
            self.info,
            self.registry,
            max_images=int(self.params.get("max_images") or 16),
            default_steps=int(self.params.get("default_steps") or 25),
            default_guidance=float(self.params.get("default_guidance") or 7.0),
        )
        nets = bls_nets(self.info, job.user_id, job.style, self.params.get("identity_mode") or "runtime_lora",
                        self.repository)
        return {"images": run_job(job, nets, self.scheduler_config, bls_detect)}

    def execute(self, requests):
        return handle_each(requests, self._generate, self.logger)
