"""Portrait generation and post-processing, shared by Triton and in-process.

``generate`` is portrait_generator's logic: tokenize -> text encoder ->
denoising loop (:mod:`facetron.diffusion.sampler`) -> VAE decoder, with
optional template mode (FaceChain's "inpaint a template photo": the
template is VAE-encoded, noised to ``strength``, denoised, and only the
template's face region is taken from the generated image).

``fuse_user_face`` is the fusion step of portrait's second half (see
:mod:`facetron.serving.portrait_call`). The nets are passed in as
callables: BLS calls inside Triton, ONNX Runtime sessions in-process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import cv2
import numpy as np

from facetron.diffusion.sampler import GenerationRequest, ProgressFn, denoise
from facetron.errors import InvalidInputError
from facetron.faces.retouch import FUSERS, face_ellipse_mask


TEMPLATE_REGION_SCALE = 1.15  # the re-generated face region of a template (x face size)
TEMPLATE_FUSE_SCALE = 1.25  # fusion covers it, so the template's own pixels form the blend boundary


@dataclass
class DiffusionNets:
    """Callables with the Triton contracts (numpy in, numpy out)."""

    tokenize: Callable[[list[str]], np.ndarray]  # -> int32 [N,77]
    text_encode: Callable[[np.ndarray], np.ndarray]  # int32 [N,77] -> f32 [N,77,C]
    unet: Callable[..., np.ndarray]  # (sample, timestep, hidden) -> noise_pred
    vae_decode: Callable[[np.ndarray], np.ndarray]  # latent -> uint8 [N,H,W,3]
    vae_encode: Optional[Callable[[np.ndarray], np.ndarray]] = None  # uint8 [N,H,W,3] -> latent
    latent_channels: int = 4
    latent_factor: int = 8


def fit_template(template: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre-crop the template to the target aspect and resize to (height, width)."""
    h, w = template.shape[:2]
    target = width / height
    if w / h > target:
        nw = int(round(h * target))
        x0 = (w - nw) // 2
        template = template[:, x0 : x0 + nw]
    else:
        nh = int(round(w / target))
        y0 = (h - nh) // 2
        template = template[y0 : y0 + nh]
    interp = cv2.INTER_AREA if template.shape[0] > height else cv2.INTER_CUBIC
    return cv2.resize(template, (width, height), interpolation=interp)


def face_region_mask(shape: tuple[int, int], landmarks: np.ndarray, feather: int = 9) -> np.ndarray:
    """float32 [H,W,1] in 0..1: the template's face (ellipse), feathered."""
    mask = face_ellipse_mask(shape, landmarks, scale=TEMPLATE_REGION_SCALE).astype(np.float32) / 255.0
    k = max(3, feather | 1)
    return cv2.GaussianBlur(mask, (k, k), 0)[..., None]


def generate(
    nets: DiffusionNets,
    scheduler_config: dict,
    prompt: str,
    negative_prompt: str,
    req: GenerationRequest,
    unet_extra: Optional[dict[str, np.ndarray]] = None,
    template: Optional[np.ndarray] = None,
    template_face: Optional[np.ndarray] = None,
    progress: Optional[ProgressFn] = None,
) -> np.ndarray:
    """Images uint8 [N, H, W, 3].

    ``unet_extra``: extra UNet inputs per call (runtime-LoRA tensors).
    ``template`` (uint8 [h,w,3]) turns on template mode; ``template_face``
    (its 5 landmarks after :func:`fit_template`) limits the generated part to
    the face region, else the whole template is re-generated."""
    if not prompt.strip():
        raise InvalidInputError("prompt", "is empty")
    req.validate(nets.latent_factor)
    ids = nets.tokenize([prompt, negative_prompt])
    hidden = nets.text_encode(ids)
    cond, uncond = hidden[:1], hidden[1:2]
    extra = unet_extra or {}

    def unet(sample: np.ndarray, t: np.ndarray, h: np.ndarray) -> np.ndarray:
        return nets.unet(sample, t, h, **extra) if extra else nets.unet(sample, t, h)

    init = None
    fitted = None
    if template is not None:
        if nets.vae_encode is None:
            raise InvalidInputError("template", "template mode needs the vae_encoder model, which is not deployed")
        fitted = fit_template(template, req.height, req.width)
        init = nets.vae_encode(fitted[None])
    latents = denoise(unet, scheduler_config, cond, uncond, req, nets.latent_channels, nets.latent_factor,
                      init_latents=init, progress=progress)
    images = nets.vae_decode(latents)
    if fitted is not None and template_face is not None:
        mask = face_region_mask(fitted.shape, template_face)
        images = (fitted[None] * (1 - mask) + images * mask + 0.5).clip(0, 255).astype(np.uint8)
    return images


def fuse_user_face(
    images: np.ndarray,
    targets: list[Optional[np.ndarray]],
    user_face: np.ndarray,
    user_landmarks: np.ndarray,
    fuser: str = "poisson",
    scale: float = 0.95,
) -> tuple[np.ndarray, np.ndarray]:
    """Fuse the user's template face onto ``targets[i]`` (5 landmarks, or None
    to leave image i unchanged) — FaceChain's face fusion. Returns (images,
    fused mask bool [N])."""
    fuse = FUSERS[fuser]
    out = images.copy()
    fused = np.zeros(len(images), bool)
    for i, target in enumerate(targets):
        if target is not None:
            out[i] = fuse(images[i], target, user_face, user_landmarks, scale=scale)
            fused[i] = True
    return out, fused
