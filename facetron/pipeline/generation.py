"""The generation path shared by ``portrait_generator``, ``portrait`` and
``portrait_stream``: a resolved job (:mod:`facetron.pipeline.job`) -> images.

``generate`` runs tokenizer -> text encoder -> denoising loop
(:mod:`facetron.diffusion.sampler`) -> VAE decoder, with optional template
mode (FaceChain's "inpaint a template photo"): diffusers'
``StableDiffusionInpaintPipeline`` in latent space over the template's face
mask (:mod:`facetron.pipeline.template`). The template is VAE-encoded, noised
to ``strength``; the face region is denoised while the rest is the template's
latent, noised to each step's level (plain UNet) or given to an inpainting
UNet as input; the decoded latents are the answer, as diffusers returns them
(no pixel paste unless asked for). With a ControlNet (``req.control``, template
mode only: diffusers' ``StableDiffusionControlNetInpaintPipeline``) each step
runs ``controlnet`` on the step's UNet input and the template's conditioning
image (:mod:`facetron.pipeline.control`, the same image for every item and
both guidance halves), then the UNet with its residuals. The nets are passed
in as callables: BLS calls inside Triton (:mod:`facetron.triton.bls`), ONNX
Runtime sessions in-process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from facetron import metrics
from facetron.contract import DEFAULT_CONTROL, MODEL_INFO, SCHEDULER_CONFIG
from facetron.diffusion.nets import DiffusionNets
from facetron.diffusion.sampler import GenerationRequest, ProgressFn, denoise
from facetron.diffusion.step_cache import step_cached
from facetron.errors import InvalidInputError
from facetron.pipeline.control import control_image
from facetron.pipeline.template import PreparedTemplate, face_region_mask, masked_template



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


def _controlled_fn(nets: DiffusionNets, extra: dict, cond: np.ndarray, scale: float) -> Callable:
    """The loop's ``unet(sample, t, hidden)`` with a ControlNet, timed as one step: ``controlnet`` on the
    sample's latent channels (an inpainting UNet's extra channels are the UNet's alone), every item with the
    conditioning image ``cond`` [3, H, W] at ``scale``, then ``unet_control`` adding its residuals."""
    channels = nets.latent_channels
    batches: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # batch size -> (images, scales), built once

    def step(sample: np.ndarray, t: np.ndarray, hidden: np.ndarray) -> np.ndarray:
        b = len(sample)
        if b not in batches:
            batches[b] = (np.ascontiguousarray(np.broadcast_to(cond, (b, *cond.shape))), np.full(b, scale, np.float32))
        images, scales = batches[b]
        residuals = nets.controlnet(np.ascontiguousarray(sample[:, :channels]), t, hidden, images, scales)
        return nets.unet_control(sample, t, hidden, residuals, **extra)
    return _timed(step)


def _control_cond(nets: DiffusionNets, req: GenerationRequest, template: Optional[PreparedTemplate]
                  ) -> Optional[np.ndarray]:
    """The request's conditioning image [3, H, W] (None: no control), its rules checked (errors name the input)."""
    if req.control == DEFAULT_CONTROL:
        return None
    if template is None:
        raise InvalidInputError("control", "only applies in template mode (send a template)")
    if nets.controlnet is None or nets.unet_control is None:
        raise InvalidInputError("control", "this deployment serves no ControlNet for its UNet (a repository assembled "
                                           "with `export repository --controlnet DIR`, the runtime-LoRA unet)")
    if req.cache_interval != 1:
        raise InvalidInputError("cache_interval", "step caching has no ControlNet graphs: use 1 with control")
    return control_image(req.control, template.image)


def generate(
    nets: DiffusionNets,
    scheduler_config: dict,
    prompt: str,
    negative_prompt: str,
    req: GenerationRequest,
    unet_extra: Optional[dict[str, np.ndarray]] = None,
    template: Optional[PreparedTemplate] = None,
    progress: Optional[ProgressFn] = None,
    unet_in_channels: Optional[int] = None,
    paste_template: bool = False,
) -> np.ndarray:
    """Images uint8 [N, H, W, 3] for a validated request (``build_job`` or ``req.validate``).

    ``unet_extra``: extra UNet inputs per call (runtime-LoRA tensors).
    ``template`` (fitted, its face found, its masks built:
    :func:`facetron.pipeline.template.prepare_template`) turns on template
    mode: its face region is inpainted (``template.latent_mask``).
    ``unet_in_channels``: the UNet's input channels; None or
    ``nets.latent_channels`` is a plain UNet (the served one),
    ``2 * latent_channels + 1`` an inpainting UNet (template mode only; the
    masked template is encoded too).
    ``paste_template``: after decoding, put the template's own pixels back
    outside its feathered face region (FaceChain's paste; not diffusers'
    pipeline, so off by default).
    ``req.control`` (template mode): each step is ``nets.controlnet`` then
    ``nets.unet_control`` on the template's conditioning image at
    ``req.control_scale`` (:func:`_controlled_fn`)."""
    channels = nets.latent_channels
    inpainting_unet = unet_in_channels not in (None, channels)
    if inpainting_unet and unet_in_channels != 2 * channels + 1:
        raise ValueError(f"unet_in_channels: expected {channels} or {2 * channels + 1}, got {unet_in_channels}")
    if inpainting_unet and template is None:
        raise InvalidInputError("template", "an inpainting UNet needs a template (it has no text-to-image mode here)")
    if inpainting_unet and req.cache_interval != 1:
        raise InvalidInputError("cache_interval", "step caching has no graphs for an inpainting UNet: use 1")
    control = _control_cond(nets, req, template)  # checked before any work
    # 1. text embeddings (conditional, unconditional)
    hidden = nets.text_encode(nets.tokenize([prompt, negative_prompt]))
    cond, uncond = hidden[:1], hidden[1:2]
    unet = _unet_fn(nets, req.cache_interval, unet_extra or {}) if control is None else \
        _controlled_fn(nets, unet_extra or {}, control, req.control_scale)

    # 2. template mode: the template's latent and mask (an inpainting UNet: the masked template's latent too)
    init = mask = masked = None
    if template is not None:
        if nets.vae_encode is None:
            raise InvalidInputError("template", "template mode needs the vae_encoder model, which is not deployed")
        init, mask = nets.vae_encode(template.image[None]), template.latent_mask
        if inpainting_unet:
            masked = nets.vae_encode(masked_template(template)[None])
    # 3. denoise, 4. decode
    latents = denoise(unet, scheduler_config, cond, uncond, req, channels, nets.latent_factor,
                      init_latents=init, progress=progress, mask=mask, masked_image_latents=masked)
    images = nets.vae_decode(latents)
    # 5. optional: the template's own pixels outside its face region
    if template is not None and paste_template:
        region = face_region_mask(template.image.shape, template.landmarks)
        images = (template.image[None] * (1 - region) + images * region + 0.5).clip(0, 255).astype(np.uint8)
    return images
