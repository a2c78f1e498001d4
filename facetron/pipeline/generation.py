"""The generation path shared by ``portrait_generator``, ``portrait`` and
``portrait_stream``: a resolved job (:mod:`facetron.pipeline.job`) -> images.

``generate`` runs tokenizer -> text encoder -> denoising loop
(:mod:`facetron.diffusion.sampler`) -> VAE decoder, with optional template
mode (FaceChain's "inpaint a template photo": the template is VAE-encoded,
noised to ``strength``, denoised, and only the template's face region is
taken from the generated image). The nets are passed in as callables: BLS
calls inside Triton (:mod:`facetron.triton.bls`), ONNX Runtime sessions
in-process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from facetron import metrics
from facetron.contract import MODEL_INFO, SCHEDULER_CONFIG
from facetron.diffusion.nets import DiffusionNets
from facetron.diffusion.sampler import GenerationRequest, ProgressFn, denoise
from facetron.diffusion.step_cache import step_cached
from facetron.errors import InvalidInputError
from facetron.pipeline.template import (
    PreparedTemplate,
    face_region_mask,
)



def read_model_info(folder: Path) -> tuple[dict, dict]:
    """(model_info, scheduler_config) written beside the generator by the assembler."""
    return json.loads((folder / MODEL_INFO).read_text()), json.loads((folder / SCHEDULER_CONFIG).read_text())


def _timed(fn: Callable) -> Callable:
    def call(*args, **kwargs):
        with metrics.current().timed_step():
            return fn(*args, **kwargs)
    return call


def _unet_fn(nets: DiffusionNets, cache_interval: int, extra: dict) -> Callable:
    """The loop's ``unet(sample, t, hidden)``: each call timed as a step, ``extra`` inputs added;
    with ``cache_interval`` > 1 a :class:`CachedUNet` over the nets' step-cache graphs."""
    plain = _timed(lambda s, t, h: nets.unet(s, t, h, **extra))
    if cache_interval == 1:
        return plain
    if nets.unet_deep is None or nets.unet_shallow is None:
        raise InvalidInputError("cache_interval", "step caching is served by the runtime-LoRA unet; this deployment "
                                                  "has no step-cache graphs for it (merged mode): use 1")
    return step_cached(plain, _timed(lambda s, t, h: nets.unet_deep(s, t, h, **extra)),
                       _timed(lambda s, t, h, f: nets.unet_shallow(s, t, h, f, **extra)), cache_interval)


def generate(
    nets: DiffusionNets,
    scheduler_config: dict,
    prompt: str,
    negative_prompt: str,
    req: GenerationRequest,
    unet_extra: Optional[dict[str, np.ndarray]] = None,
    template: Optional[PreparedTemplate] = None,
    progress: Optional[ProgressFn] = None,
) -> np.ndarray:
    """Images uint8 [N, H, W, 3] for a validated request (``build_job`` or ``req.validate``).

    ``unet_extra``: extra UNet inputs per call (runtime-LoRA tensors).
    ``template`` (fitted, its face found: :func:`serving.template.prepare_template`)
    turns on template mode: only its face region is re-generated."""
    # 1. text embeddings (conditional, unconditional)
    hidden = nets.text_encode(nets.tokenize([prompt, negative_prompt]))
    cond, uncond = hidden[:1], hidden[1:2]
    unet = _unet_fn(nets, req.cache_interval, unet_extra or {})

    # 2. template mode: start from the template's latent
    init = None
    if template is not None:
        if nets.vae_encode is None:
            raise InvalidInputError("template", "template mode needs the vae_encoder model, which is not deployed")
        init = nets.vae_encode(template.image[None])
    # 3. denoise, 4. decode
    latents = denoise(unet, scheduler_config, cond, uncond, req, nets.latent_channels, nets.latent_factor,
                      init_latents=init, progress=progress)
    images = nets.vae_decode(latents)
    # 5. template mode: keep the template outside its face region
    if template is not None:
        mask = face_region_mask(template.image.shape, template.landmarks)
        images = (template.image[None] * (1 - mask) + images * mask + 0.5).clip(0, 255).astype(np.uint8)
    return images
