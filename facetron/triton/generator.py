"""What the generation path needs inside Triton, read once in a model's
``initialize``: the generator's parameters, the base model's info and
scheduler config, the user registry, and the diffusion nets as BLS calls
(:mod:`facetron.triton.bls`). Shared by ``portrait_generator``,
``portrait`` and ``portrait_stream``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, TypeVar

import numpy as np

from facetron import contract
from facetron.contract import FaceSelectParams, GeneratorParams, ModelParams
from facetron.diffusion.sampler import ProgressFn
from facetron.faces.select import SelectRules
from facetron.pipeline.generation import generate, read_model_info
from facetron.pipeline.job import (
    GenerationJob,
    PortraitJob,
    build_job,
    build_portrait_job,
)
from facetron.pipeline.net_io import read_down_factor
from facetron.pipeline.selection import select_rules
from facetron.pipeline.template import PreparedTemplate, prepare_template
from facetron.request import GeneratorRequest, PortraitRequest
from facetron.triton import bls
from facetron.triton.backend import pb, read_params, repository_dir
from facetron.users import UserRegistry, served_registry

P = TypeVar("P", bound=ModelParams)


def model_params(repository: Path, model: str, cls: type[P]) -> P:
    """Another model's typed parameters, read from its ``config.pbtxt`` in the
    same repository (defaults where the model or a parameter is absent)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    path = repository / model / "config.pbtxt"
    if not path.is_file():
        return cls()
    config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    return cls.from_config({k: v.string_value for k, v in config.parameters.items()})


def served_down_factor(repository: Path) -> int:
    """The down factor a request's sides must fit (in latent cells): the least common multiple of what the
    repository's runtime-LoRA and inpainting UNets' graphs record (:func:`facetron.pipeline.net_io.read_down_factor`,
    each the rule that UNet's served model checks; its fallback for a graph exported before the record)."""
    served = [folder for name in contract.LORA_BANK_UNETS
              if ((folder := repository / name / contract.VERSION_FOLDER) / contract.IO_FILE).is_file()]
    return math.lcm(*map(read_down_factor, served)) if served else contract.DEFAULT_UNET_DOWN_FACTOR


@dataclass
class ServedGenerator:
    """What the generation path needs inside Triton, read once in ``initialize``."""

    params: GeneratorParams
    repository: Path
    info: dict
    scheduler_config: dict
    registry: UserRegistry
    merged: bls.MergedModels
    rules: SelectRules  # face_select's thresholds, as that model is configured
    token: Optional[str] = field(default=None, repr=False)  # the caller's per-user token (acting_for)

    @classmethod
    def from_args(cls, args: dict, params_class: type[GeneratorParams] = GeneratorParams) -> "ServedGenerator":
        params = read_params(args, params_class)
        repository = repository_dir(args)
        info, scheduler_config = read_model_info(repository / contract.PORTRAIT_GENERATOR.name / contract.VERSION_FOLDER)
        info = {**info, contract.UNET_DOWN_FACTOR: served_down_factor(repository)}  # the sides build_job lets through
        rules = select_rules(model_params(repository, contract.FACE_SELECT.name, FaceSelectParams))
        registry = served_registry(params.users_dir)
        if not registry.require_tokens:
            pb().Logger.log_warn(f"{args['model_name']}: per-user tokens are OFF (facetron serve --no-user-tokens): "
                                 "any caller can generate as any registered user")
        return cls(params, repository, info, scheduler_config, registry,
                   bls.MergedModels(params.max_merged_models), rules)

    def acting_for(self, token: Optional[str]) -> "ServedGenerator":
        """This generator for one caller: its per-user token opens the user (UserRegistry.pin)
        and goes with every net call that reads the user."""
        return replace(self, token=token)

    def job(self, request: GeneratorRequest) -> GenerationJob:
        return build_job(request, self.info, self.registry, self.params, token=self.token)

    def portrait_job(self, request: PortraitRequest) -> PortraitJob:
        return build_portrait_job(request, self.info, self.registry, self.params, token=self.token)

    def template(self, job: GenerationJob) -> Optional[PreparedTemplate]:
        """The job's template, fitted and its face found (one face_detector call)."""
        if job.template is None:
            return None
        return prepare_template(job.template, job.sampling.height, job.sampling.width, bls.detect)

    def images(self, job: GenerationJob, template: Optional[PreparedTemplate],
               progress: Optional[ProgressFn] = None) -> np.ndarray:
        nets = bls.diffusion_nets(self.info, job.user_id, job.style, self.params.identity_mode, self.repository,
                                  self.merged, job.user_version, self.token, job.vae, unet_model=job.unet)
        return generate(nets, self.scheduler_config, job.prompt, job.negative_prompt, job.sampling,
                        template=template, progress=progress, paste_template=job.paste_template,
                        unet_in_channels=job.unet_in_channels)
