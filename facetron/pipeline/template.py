"""The template photo of template mode: fitted to the output size, its
subject's face found and its inpainting mask built once per request; the
generator inpaints that face region (diffusers' ``StableDiffusionInpaintPipeline``,
:func:`facetron.diffusion.sampler.denoise`), and ``portrait`` counts a
generated face only where it was (and fuses there when the generator made
none).

The mask is the face ellipse (:func:`facetron.faces.retouch.face_ellipse_mask`
at :data:`TEMPLATE_REGION_SCALE`, the region fusion uses), 1 = re-generated.
At pixel resolution it is what diffusers' ``mask_processor`` makes of it
(``VaeImageProcessor(do_binarize=True)``: values < 0.5 -> 0, else 1; the
ellipse is already {0, 1}); at latent resolution it is what the pipelines'
``prepare_mask_latents`` makes of that: ``torch.nn.functional.interpolate``
to (H/f, W/f), mode ``nearest``, which for an integer factor f takes pixel
(f*i, f*j) for cell (i, j) (:func:`latent_mask`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np

from facetron.contract import LATENT_FACTOR
from facetron.errors import InvalidInputError
from facetron.faces.retouch import face_ellipse_mask
from facetron.faces.select import main_face

TEMPLATE_REGION_SCALE = 1.15  # the re-generated face region of a template (x face size)
MASKED_FILL = 128  # uint8 of the masked template's re-generated region (diffusers' 0.0 in [-1, 1] is 127.5)


@dataclass(frozen=True)
class PreparedTemplate:
    image: np.ndarray  # uint8 [H, W, 3], fitted to the request's height x width
    landmarks: np.ndarray  # float32 [5, 2]: the subject's face in ``image``
    mask: np.ndarray  # float32 {0, 1} [H, W]: the inpainting mask (1 = re-generated), :func:`inpaint_mask`
    latent_mask: np.ndarray  # float32 {0, 1} [H/f, W/f]: ``mask`` at latent resolution, :func:`latent_mask`

    @classmethod
    def of(cls, image: np.ndarray, landmarks: np.ndarray, latent_factor: int = LATENT_FACTOR) -> "PreparedTemplate":
        """A fitted template and its face's landmarks, with the masks built from them."""
        landmarks = np.asarray(landmarks, np.float32)
        mask = inpaint_mask(image.shape, landmarks)
        return cls(image, landmarks, mask, latent_mask(mask, latent_factor))


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


def prepare_template(template: np.ndarray, height: int, width: int,
                     detect: Callable[[np.ndarray], dict[str, np.ndarray]],
                     latent_factor: int = LATENT_FACTOR) -> PreparedTemplate:
    """Fit the template, find its subject's face (one detector call) and build its masks."""
    fitted = fit_template(template, height, width)
    dets = detect(fitted[None])
    j = main_face(dets, 0, fitted.shape[:2])
    if j is None:
        raise InvalidInputError("template", "no face found: template mode needs a photo with a face")
    return PreparedTemplate.of(fitted, dets["landmarks"][0, j], latent_factor)


def inpaint_mask(shape: tuple[int, ...], landmarks: np.ndarray) -> np.ndarray:
    """float32 {0, 1} [H, W]: the template's face ellipse, 1 = re-generated."""
    return (face_ellipse_mask(shape, landmarks, scale=TEMPLATE_REGION_SCALE) > 0).astype(np.float32)


def latent_mask(mask: np.ndarray, latent_factor: int) -> np.ndarray:
    """``mask`` [H, W] (H, W multiples of ``latent_factor``) at latent resolution, binarized at 0.5 and
    resized as diffusers' inpaint pipelines do (nearest: cell (i, j) = pixel (f*i, f*j))."""
    binary = (np.asarray(mask, np.float32) >= 0.5).astype(np.float32)
    return np.ascontiguousarray(binary[::latent_factor, ::latent_factor])


def masked_template(template: PreparedTemplate) -> np.ndarray:
    """uint8 [H, W, 3]: the template with its re-generated region set to :data:`MASKED_FILL`
    (the ``masked_image`` an inpainting UNet is conditioned on)."""
    return np.where(template.mask[..., None] >= 0.5, np.uint8(MASKED_FILL), template.image)


def face_region_mask(shape: tuple[int, ...], landmarks: np.ndarray, feather: int = 9) -> np.ndarray:
    """float32 [H,W,1] in 0..1: the template's face (ellipse), feathered (the optional pixel paste)."""
    mask = face_ellipse_mask(shape, landmarks, scale=TEMPLATE_REGION_SCALE).astype(np.float32) / 255.0
    k = max(3, feather | 1)
    return cv2.GaussianBlur(mask, (k, k), 0)[..., None]
