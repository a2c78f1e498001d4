"""Contact sheets: images in a grid with a text label under each (cv2, numpy).

Used by ``facetron generate`` and ``facetron demo`` (grid.png of the returned
portraits with rank and both similarities: the generated face's and the
returned picture's), ``facetron evaluate`` and the benchmarks. A label may
hold several lines (``\n``).
"""

from __future__ import annotations

import math
from typing import Sequence

import cv2
import numpy as np

from facetron.errors import InvalidInputError

BACKGROUND = (245, 245, 245)
TEXT = (20, 20, 20)


def _fit(image: np.ndarray, cell: int) -> np.ndarray:
    """``image`` scaled to fit a cell×cell square, centred on the background."""
    h, w = image.shape[:2]
    scale = cell / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (nw, nh), interpolation=interp)
    out = np.full((cell, cell, 3), BACKGROUND, np.uint8)
    y, x = (cell - nh) // 2, (cell - nw) // 2
    out[y : y + nh, x : x + nw] = resized
    return out


def _label(text: str, width: int, height: int) -> np.ndarray:
    lines = text.split("\n")
    if len(lines) > 1:
        step = height // len(lines)
        return np.concatenate([_label(line, width, step) for line in lines]
                              + [np.full((height - step * len(lines), width, 3), BACKGROUND, np.uint8)])
    band = np.full((height, width, 3), BACKGROUND, np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    scale = height / 40.0
    thickness = max(1, round(scale * 1.5))
    (tw, th), _ = cv2.getTextSize(text, font, scale, thickness)
    if tw > width - 4:  # shrink long labels to fit the cell
        scale *= (width - 4) / tw
        (tw, th), _ = cv2.getTextSize(text, font, scale, thickness)
    cv2.putText(band, text, ((width - tw) // 2, (height + th) // 2), font, scale, TEXT, thickness, cv2.LINE_AA)
    return band


def draw_grid(
    images: Sequence[np.ndarray] | np.ndarray,
    labels: Sequence[str] | None = None,
    cols: int | None = None,
    cell: int = 256,
    pad: int = 6,
) -> np.ndarray:
    """RGB uint8 grid of ``images`` (any sizes, fitted to ``cell`` px squares),
    ``labels`` under them, ``cols`` per row (default: about square)."""
    images = list(images)
    if not images:
        raise InvalidInputError("images", "no images to draw")
    if labels is not None and len(labels) != len(images):
        raise InvalidInputError("labels", f"{len(labels)} labels for {len(images)} images")
    for i, im in enumerate(images):
        if im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
            raise InvalidInputError(f"images[{i}]", f"expected RGB uint8 [H, W, 3], got {im.dtype} {list(im.shape)}")
    cols = max(1, min(cols or math.ceil(math.sqrt(len(images))), len(images)))
    rows = math.ceil(len(images) / cols)
    lines = max((str(t).count("\n") + 1 for t in labels), default=1) if labels is not None else 0
    band = max(16, cell // 8) * lines
    ch, cw = cell + band, cell
    sheet = np.full((rows * ch + (rows + 1) * pad, cols * cw + (cols + 1) * pad, 3), BACKGROUND, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        y, x = pad + r * (ch + pad), pad + c * (cw + pad)
        sheet[y : y + cell, x : x + cell] = _fit(im, cell)
        if labels is not None:
            sheet[y + cell : y + ch, x : x + cw] = _label(str(labels[i]), cw, band)
    return sheet


def _sim(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else "no face"


def similarity_labels(generated: Sequence[float], final: Sequence[float], rank: Sequence[int],
                      indices: Sequence[int], ranked_by: str = "generated", prefix: Sequence[str] | None = None) -> list[str]:
    """Two lines per candidate ``indices[k]``: "[prefix ]#rank", then both
    similarities, the one that ranked marked with ``*``:
    "gen 0.712*  final 0.845" ("no face" where none was found)."""
    out = []
    for k, i in enumerate(indices):
        r = int(rank[i])
        g, f = _sim(float(generated[i])), _sim(float(final[i]))
        g, f = (g + "*", f) if ranked_by == "generated" else (g, f + "*")
        head = f"#{r}" if r >= 0 else f"cand {i}: filtered"
        if prefix is not None:
            head = f"{prefix[k]} {head}"
        out.append(f"{head}\ngen {g}  final {f}")
    return out
