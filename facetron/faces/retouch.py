"""Classical head mask, skin smoothing and white background.

FaceChain uses learned models here (face parsing, skin retouching). facetron
ships classical versions behind a small interface (:class:`Retoucher`) so a
learned model can replace each one: register it in :data:`RETOUCHERS`. Face
fusion lives in :mod:`facetron.faces.fusion`.

Landmarks are MTCNN's 5 points: left eye, right eye, nose, mouth left,
mouth right, as (x, y) pixels.
"""

from __future__ import annotations

from typing import Callable, Protocol

import cv2
import numpy as np



def face_ellipse_mask(shape: tuple[int, int], landmarks: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """uint8 {0,255} mask of an ellipse covering the face (brows to chin).

    Built from the 5 landmarks: centre between eyes and mouth, width from
    the eye distance, tilted along the eye line."""
    lm = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    eyes = (lm[0] + lm[1]) / 2
    mouth = (lm[3] + lm[4]) / 2
    eye_dist = float(np.linalg.norm(lm[1] - lm[0]))
    centre = eyes + 0.45 * (mouth - eyes)
    angle = float(np.degrees(np.arctan2(lm[1, 1] - lm[0, 1], lm[1, 0] - lm[0, 0])))
    axes = (max(1, int(1.05 * eye_dist * scale)), max(1, int(1.45 * eye_dist * scale)))
    mask = np.zeros(shape[:2], np.uint8)
    cv2.ellipse(mask, (int(round(centre[0])), int(round(centre[1]))), axes, angle, 0, 360, 255, -1)
    return mask


def head_mask(shape: tuple[int, int], landmarks: np.ndarray) -> np.ndarray:
    """A larger ellipse that also covers hair and ears (for white background)."""
    mask = face_ellipse_mask(shape, landmarks, scale=1.9)
    lm = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    shift = int(0.6 * np.linalg.norm(lm[1] - lm[0]))
    up = np.zeros_like(mask)
    up[: mask.shape[0] - shift] = mask[shift:]  # the same ellipse moved up, over the hair
    return np.maximum(mask, up)


def _feather(mask: np.ndarray, radius: int) -> np.ndarray:
    k = max(3, (radius // 2) * 2 + 1)
    return cv2.GaussianBlur(mask.astype(np.float32) / 255.0, (k, k), 0)[..., None]


def smooth_skin(image: np.ndarray, landmarks: np.ndarray, strength: float = 0.6) -> np.ndarray:
    """Edge-preserving smoothing inside the face ellipse, feathered at its rim."""
    lm = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    eye_dist = float(np.linalg.norm(lm[1] - lm[0]))
    diameter = int(np.clip(eye_dist / 6, 5, 25))
    smooth = cv2.bilateralFilter(image, diameter, 40, diameter)
    alpha = _feather(face_ellipse_mask(image.shape, lm), diameter * 2) * float(np.clip(strength, 0, 1))
    out = image.astype(np.float32) * (1 - alpha) + smooth.astype(np.float32) * alpha
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def white_background(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """Keep the head (ellipse around face + hair), paint the rest white."""
    alpha = _feather(head_mask(image.shape, landmarks), 31)
    out = image.astype(np.float32) * alpha + 255.0 * (1 - alpha)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


class Retoucher(Protocol):
    def __call__(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray: ...


RETOUCHERS: dict[str, Callable[..., np.ndarray]] = {
    "none": lambda image, landmarks: image,
    "smooth_skin": smooth_skin,
    "white_background": white_background,
}
