"""Real photos from installed packages, as RGB arrays (shared by face tests)."""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

from facetron.assets import asset_path
from facetron.faces import crop
from facetron.imageio import load_image


@lru_cache(maxsize=None)
def photo(name: str) -> np.ndarray:
    """``t1`` (6 people), ``tom_hanks``, ``astronaut``."""
    return load_image(asset_path(f"photo_{name}"))


def square_crop(image: np.ndarray, box: np.ndarray, margin: float = 1.0, size: int = 256) -> np.ndarray:
    """A square crop around ``box`` (x1,y1,x2,y2), ``margin`` × box side on each side, gray outside."""
    return crop.square_crop(image, box, size, 1 + 2 * margin, border_value=128, interpolation=cv2.INTER_AREA)
