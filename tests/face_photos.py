"""Real photos from installed packages, as RGB arrays (shared by face tests)."""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

from facetron.assets import asset_path
from facetron.imageio import load_image


@lru_cache(maxsize=None)
def photo(name: str) -> np.ndarray:
    """``t1`` (6 people), ``tom_hanks``, ``astronaut``."""
    return load_image(asset_path(f"photo_{name}"))


def square_crop(image: np.ndarray, box: np.ndarray, margin: float = 1.0, size: int = 256) -> np.ndarray:
    """A square crop around ``box`` (x1,y1,x2,y2), ``margin`` × box side on each side, resized."""
    x1, y1, x2, y2 = box
    cx, cy, side = (x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, y2 - y1) * (1 + 2 * margin)
    m = np.array([[size / side, 0, size / 2 - cx * size / side], [0, size / side, size / 2 - cy * size / side]])
    return cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_CONSTANT, borderValue=(128, 128, 128))
