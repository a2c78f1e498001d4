"""Template photos for the demo's template mode (FaceChain's "inpaint a
template" mode), cut from insightface's ``t1.jpg`` (a sample image shipped
with the insightface package): one person per template, square, with no
second face in frame."""

from __future__ import annotations

import cv2
import numpy as np

from facetron.assets import asset_path
from facetron.faces.crop import square_crop
from facetron.imageio import load_image

TEMPLATE_SOURCE = "insightface data/images/t1.jpg (sample image shipped by insightface)"


def demo_templates(detector, size: int = 256, count: int = 3) -> list[tuple[str, np.ndarray]]:
    """Up to ``count`` single-person square templates (name, image)."""
    t1 = load_image(asset_path("photo_t1"))
    boxes = detector.detect(t1).boxes
    out = []
    for i in np.argsort(boxes[:, 0]):  # left to right
        for margin in (1.0, 0.7, 0.45):  # widest crop that keeps neighbours out
            # a little more body than sky: the centre moves down a quarter of the face height
            crop = square_crop(t1, boxes[i], size, 1 + 2 * margin, shift=-0.25, interpolation=cv2.INTER_AREA)
            if len(detector.detect(crop)) == 1:
                out.append((f"t1_person{int(i)}", crop))
                break
        if len(out) == count:
            break
    return out
