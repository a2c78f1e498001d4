"""The template photo of template mode: fitted to the output size and its
subject's face found once per request; the generator re-generates that face
region, and ``portrait`` counts a generated face only where it was (and
fuses there when the generator made none)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np

from facetron.errors import InvalidInputError
from facetron.faces.retouch import face_ellipse_mask
from facetron.faces.select import main_face

TEMPLATE_REGION_SCALE = 1.15  # the re-generated face region of a template (x face size)


@dataclass(frozen=True)
class PreparedTemplate:
    image: np.ndarray  # uint8 [H, W, 3], fitted to the request's height x width
    landmarks: np.ndarray  # float32 [5, 2]: the subject's face in ``image``


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
                     detect: Callable[[np.ndarray], dict[str, np.ndarray]]) -> PreparedTemplate:
    """Fit the template and find its subject's face (one detector call)."""
    fitted = fit_template(template, height, width)
    dets = detect(fitted[None])
    j = main_face(dets, 0, fitted.shape[:2])
    if j is None:
        raise InvalidInputError("template", "no face found: template mode needs a photo with a face")
    return PreparedTemplate(fitted, np.asarray(dets["landmarks"][0, j], np.float32))


def face_region_mask(shape: tuple[int, ...], landmarks: np.ndarray, feather: int = 9) -> np.ndarray:
    """float32 [H,W,1] in 0..1: the template's face (ellipse), feathered."""
    mask = face_ellipse_mask(shape, landmarks, scale=TEMPLATE_REGION_SCALE).astype(np.float32) / 255.0
    k = max(3, feather | 1)
    return cv2.GaussianBlur(mask, (k, k), 0)[..., None]
