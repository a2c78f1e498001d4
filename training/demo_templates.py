"""Template photos for the demo's template mode (FaceChain's "inpaint a
template" mode), cut from insightface's ``t1.jpg`` (a sample image shipped
with the insightface package): one person per template, square, with no
second face in frame."""

from __future__ import annotations

import numpy as np

from facetron.assets import asset_path
from facetron.imageio import load_image

TEMPLATE_SOURCE = "insightface data/images/t1.jpg (sample image shipped by insightface)"


def _crop(image: np.ndarray, box: np.ndarray, margin: float, size: int) -> np.ndarray:
    import cv2

    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2 + 0.25 * (y2 - y1)  # a little more body than sky
    side = max(x2 - x1, y2 - y1) * (1 + 2 * margin)
    s = size / side
    m = np.array([[s, 0, size / 2 - cx * s], [0, s, size / 2 - cy * s]])
    return cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REPLICATE)


def demo_templates(detector, size: int = 256, count: int = 3) -> list[tuple[str, np.ndarray]]:
    """Up to ``count`` single-person square templates (name, image)."""
    t1 = load_image(asset_path("photo_t1"))
    boxes = detector.detect(t1).boxes
    out = []
    for i in np.argsort(boxes[:, 0]):  # left to right
        for margin in (1.0, 0.7, 0.45):  # widest crop that keeps neighbours out
            crop = _crop(t1, boxes[i], margin, size)
            if len(detector.detect(crop)) == 1:
                out.append((f"t1_person{int(i)}", crop))
                break
        if len(out) == count:
            break
    return out
