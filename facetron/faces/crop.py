"""Square crops around a face box (training crops, templates, test and
benchmark candidates)."""

from __future__ import annotations

import cv2
import numpy as np


def square_crop(
    image: np.ndarray,
    box: np.ndarray,
    size: int,
    scale: float,
    shift: float = 0.0,
    border_value: int | None = None,
    interpolation: int | None = None,
) -> np.ndarray:
    """A ``size``² crop centred on ``box`` (x1, y1, x2, y2), side = ``scale`` x the
    box's longer side, centre moved up by ``shift`` x the box height (negative:
    down). Outside the image: edge pixels repeated, or ``border_value`` gray.
    ``interpolation`` defaults to area when shrinking, cubic when enlarging."""
    x1, y1, x2, y2 = [float(v) for v in box]
    side = max(x2 - x1, y2 - y1) * scale
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2 - shift * (y2 - y1)
    s = size / side
    m = np.array([[s, 0, size / 2 - cx * s], [0, s, size / 2 - cy * s]])
    if interpolation is None:
        interpolation = cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC
    if border_value is None:
        return cv2.warpAffine(image, m, (size, size), flags=interpolation, borderMode=cv2.BORDER_REPLICATE)
    return cv2.warpAffine(image, m, (size, size), flags=interpolation, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=(border_value,) * 3)
