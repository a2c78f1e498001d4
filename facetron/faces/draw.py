"""Annotated pictures: detected faces drawn on the image."""

from __future__ import annotations

import cv2
import numpy as np

_LANDMARK_COLORS = [(255, 64, 64), (64, 64, 255), (64, 255, 64), (255, 200, 0), (255, 0, 255)]


def draw_detections(image: np.ndarray, boxes: np.ndarray, scores: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """A copy of ``image`` with boxes, scores and the 5 landmarks drawn."""
    out = image.copy()
    thick = max(1, round(max(image.shape[:2]) / 400))
    for box, score, marks in zip(boxes, scores, landmarks):
        x1, y1, x2, y2 = [int(round(v)) for v in box]
        cv2.rectangle(out, (x1, y1), (x2, y2), (0, 255, 0), thick)
        cv2.putText(out, f"{score:.2f}", (x1, max(12, y1 - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thick, (0, 255, 0), thick)
        for (x, y), color in zip(marks, _LANDMARK_COLORS):
            cv2.circle(out, (int(round(x)), int(round(y))), 2 * thick, color, -1)
    return out
