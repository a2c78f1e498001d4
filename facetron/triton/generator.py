"""What the generation path needs inside Triton, read once in a model's
``initialize``: the generator's parameters, the base model's info and
scheduler config, the user registry, and the diffusion nets as BLS calls
(:mod:`facetron.triton.bls`). Shared by ``portrait_generator``,
``portrait`` and ``portrait_stream``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from facetron import contract
from facetron.contract import GeneratorParams
from facetron.diffusion.sampler import ProgressFn
from facetron.pipeline.generation import (
    GenerationJob,
    build_job,
    generate,
    generation_values,
    read_model_info,
)
from facetron.pipeline.template import PreparedTemplate, prepare_template
from facetron.triton import bls
from facetron.triton.backend import read_params, repository_dir
from facetron.users import UserRegistry, registry_at


@dataclass
class ServedGenerator:
    """What the generation path needs inside Triton, read once in ``initialize``."""

    params: GeneratorParams
    repository: Path
    info: dict
    scheduler_config: dict
    registry: UserRegistry
    merged: bls.MergedModels

    @classmethod
    def from_args(cls, args: dict, params_class: type[GeneratorParams] = GeneratorParams) -> "ServedGenerator":
        params = read_params(args, params_class)
        repository = repository_dir(args)
        info, scheduler_config = read_model_info(repository / contract.PORTRAIT_GENERATOR.name / "1")
        return cls(params, repository, info, scheduler_config, registry_at(params.users_dir),
                   bls.MergedModels(params.max_merged_models))

    def job(self, arrays: dict[str, np.ndarray]) -> GenerationJob:
        return build_job(generation_values(arrays), self.info, self.registry, self.params)

    def template(self, job: GenerationJob) -> Optional[PreparedTemplate]:
        """The job's template, fitted and its face found (one face_detector call)."""
        if job.template is None:
            return None
        return prepare_template(job.template, job.request.height, job.request.width, bls.detect)

    def images(self, job: GenerationJob, template: Optional[PreparedTemplate],
               progress: Optional[ProgressFn] = None) -> np.ndarray:
        version = self.registry.version(job.user_id) if job.user_id else None
        nets = bls.diffusion_nets(self.info, job.user_id, job.style, self.params.identity_mode, self.repository,
                                  self.merged, version)
        return generate(nets, self.scheduler_config, job.prompt, job.negative_prompt, job.request,
                        template=template, progress=progress)
