"""The generation path shared by ``portrait_generator``, ``portrait`` and
``portrait_stream``: a request's values -> a validated job -> images.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from facetron import contract, metrics
from facetron.contract import GeneratorParams
from facetron.diffusion.nets import DiffusionNets
from facetron.diffusion.sampler import GenerationRequest, ProgressFn, denoise
from facetron.diffusion.step_cache import step_cached
from facetron.diffusion.styles import DEFAULT_STYLE, style_prompt
from facetron.errors import InvalidInputError
from facetron.pipeline.template import (
    PreparedTemplate,
    check_template,
    face_region_mask,
)
from facetron.request import one_scalar, one_string
from facetron.styles import StyleRegistry, styles_for
from facetron.users import UserRegistry, validate_user_id

MODEL_INFO = "model_info.json"
SCHEDULER_CONFIG = "scheduler_config.json"


@dataclass
class GenerationJob:
    """A validated generation request."""

    prompt: str
    negative_prompt: str
    user_id: str  # "" = base model
    style: str
    request: GenerationRequest
    template: Optional[np.ndarray] = None  # as sent; fitted by serving.template


def read_model_info(folder: Path) -> tuple[dict, dict]:
    """(model_info, scheduler_config) written beside the generator by the assembler."""
    return json.loads((folder / MODEL_INFO).read_text()), json.loads((folder / SCHEDULER_CONFIG).read_text())


def generation_values(arrays: dict[str, np.ndarray]) -> dict:
    """The generation inputs (tensors by name, any subset) as plain Python values."""
    values: dict = {name: one_string(arrays[name], name) for name in contract.GENERATION_STRINGS
                    if arrays.get(name) is not None}
    values.update({name: one_scalar(arrays[name], name, dtype) for name, dtype in contract.SCALAR_INPUTS.items()
                   if arrays.get(name) is not None})
    values["template"] = arrays.get("template")
    return values


def _prompt(values: dict, style, trigger: str, subject: str) -> str:
    prompt = values.get("prompt")
    if prompt is None:
        return style_prompt(style, trigger, subject)
    if not prompt.strip():
        raise InvalidInputError("prompt", "is empty (omit it to use the style's prompt)")
    return prompt.replace("{trigger}", trigger)


def build_job(values: dict, info: dict, registry: UserRegistry, params: GeneratorParams = GeneratorParams(),
              styles: StyleRegistry | None = None) -> GenerationJob:
    """Resolve defaults and validate everything a client sent, once (errors name the input)."""
    user_id = values.get("user_id") or ""
    if user_id:
        validate_user_id(user_id)
    style_name = values.get("style") or DEFAULT_STYLE
    style = (styles or styles_for(registry.root)).get(style_name)  # built-in or installed; unknown: INVALID_ARGUMENT
    trigger, subject = registry.identity_text(user_id)
    prompt = _prompt(values, style, trigger, subject)
    negative = values.get("negative_prompt")
    negative = style.negative if negative is None else negative
    template = values.get("template")
    if template is not None:
        check_template(template)
    res = int(info["resolution"])

    def given(name: str, default):
        return default if values.get(name) is None else values[name]

    req = GenerationRequest(
        num_images=int(given("num_images", contract.DEFAULT_NUM_IMAGES)),
        steps=int(given("steps", params.default_steps)),
        guidance=float(given("guidance", params.default_guidance)),
        # no seed given: a fresh random one (OS entropy), returned in portrait's report so the call can be repeated
        seed=(contract.check_seed(int(values["seed"])) if values.get("seed") is not None
              else int(np.random.SeedSequence().entropy % 2**31)),
        height=int(values.get("height") or res),
        width=int(values.get("width") or res),
        scheduler=values.get("scheduler") or contract.DEFAULT_SCHEDULER,
        strength=float(given("strength", contract.DEFAULT_STRENGTH)),
        cache_interval=int(given("cache_interval", contract.DEFAULT_CACHE_INTERVAL)),
    )
    req.validate(int(info["latent_factor"]), params.max_images)
    contract.check_budget(num_images=req.num_images, steps=req.steps, height=req.height, width=req.width, native=res,
                          max_side_factor=params.max_side_factor, max_work=params.max_work)
    return GenerationJob(prompt, negative, user_id, style_name, req, template)


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
    if not prompt.strip():
        raise InvalidInputError("prompt", "is empty")
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
