"""Face quality scores and the gate that uses them.

Scores are computed on the face crop resized to a fixed side, so blur and
exposure are comparable between small and large faces. Thresholds live in
:class:`QualityThresholds` (one place); every failed rule is reported by
name so a preprocessing report can say why a photo was dropped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

_CROP_SIDE = 128


@dataclass(frozen=True)
class QualityThresholds:
    min_score: float = 0.90  # detector confidence
    min_face_px: float = 64.0  # shorter side of the face box, pixels
    min_sharpness: float = 40.0  # variance of Laplacian on the 128 px crop
    min_brightness: float = 40.0  # mean luma, 0..255
    max_brightness: float = 220.0
    min_contrast: float = 20.0  # std of luma


@dataclass(frozen=True)
class FaceQuality:
    score: float
    face_px: float
    sharpness: float
    brightness: float
    contrast: float

    def failures(self, t: QualityThresholds = QualityThresholds()) -> list[str]:
        """Names and values of the rules this face breaks (empty = passes)."""
        out = []
        if self.score < t.min_score:
            out.append(f"detector score {self.score:.2f} < {t.min_score}")
        if self.face_px < t.min_face_px:
            out.append(f"face {self.face_px:.0f} px < {t.min_face_px:.0f} px")
        if self.sharpness < t.min_sharpness:
            out.append(f"blurry: sharpness {self.sharpness:.1f} < {t.min_sharpness}")
        if self.brightness < t.min_brightness:
            out.append(f"too dark: brightness {self.brightness:.0f} < {t.min_brightness:.0f}")
        if self.brightness > t.max_brightness:
            out.append(f"overexposed: brightness {self.brightness:.0f} > {t.max_brightness:.0f}")
        if self.contrast < t.min_contrast:
            out.append(f"flat: contrast {self.contrast:.1f} < {t.min_contrast}")
        return out

    def as_dict(self) -> dict[str, float]:
        return {k: round(float(v), 3) for k, v in asdict(self).items()}


def face_crop(image: np.ndarray, box: np.ndarray, side: int = _CROP_SIDE) -> np.ndarray:
    """The box's pixels (clipped to the image) resized to ``side``²."""
    h, w = image.shape[:2]
    x1, y1, x2, y2 = np.round(np.asarray(box, dtype=np.float64)).astype(int)
    x1, y1 = max(x1, 0), max(y1, 0)
    x2, y2 = min(x2, w), min(y2, h)
    if x2 <= x1 or y2 <= y1:
        return np.zeros((side, side, 3), np.uint8)
    return cv2.resize(image[y1:y2, x1:x2], (side, side), interpolation=cv2.INTER_AREA)


def face_quality(image: np.ndarray, box: np.ndarray, score: float) -> FaceQuality:
    """Quality scores of one detected face (``box`` = x1, y1, x2, y2)."""
    box = np.asarray(box, dtype=np.float32)
    gray = cv2.cvtColor(face_crop(image, box), cv2.COLOR_RGB2GRAY)
    sharp = float(cv2.Laplacian(gray, cv2.CV_64F).var())
    return FaceQuality(
        score=float(score),
        face_px=float(min(box[2] - box[0], box[3] - box[1])),
        sharpness=sharp,
        brightness=float(gray.mean()),
        contrast=float(gray.std()),
    )
