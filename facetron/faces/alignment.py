"""Face alignment: 5-point similarity transforms and 150x150 chips in dlib's layout.

The embedder (dlib's ResNet) was trained on chips cut by dlib's
``get_face_chip(img, shape, 150, 0.25)``, so every chip here reproduces dlib's
extraction (``dlib/image_transforms/interpolation.h``):

* the chip->image similarity transform is fitted (Umeyama) from template points
  to landmarks; dlib then re-expresses it as a rotated rectangle whose corner
  pixels map to the chip's corner pixels (``centered_drect`` subtracts one from
  the width), which stretches the transform by ``(size*s - 1) / ((size-1)*s)``;
  :func:`dlib_chip_transform` keeps that quirk so our chip matches dlib's.
  :func:`align_faces` uses its fit directly: its template was measured in the
  pixels of real dlib chips, so the quirk is already inside it;
* when the face is more than about twice the chip size, dlib first halves the
  image with its 5-tap ``pyramid_down<2>`` and samples the smaller level;
* sampling is bilinear with results truncated (not rounded) to uint8, and
  pixels whose 2x2 neighbourhood leaves the image are black.

Sampling here is ``cv2.warpAffine`` on float32 pixels followed by ``floor``.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from facetron.contract import CHIP_SIZE
from facetron.errors import InvalidInputError
from facetron.faces.alignment_math import similarity_transform
from facetron.imageio import check_rgb_array

CHIP_PADDING = 0.25

# dlib's mean positions of its 5-point shape (0,1: image-right eye outer/inner
# corner, 2,3: image-left eye outer/inner corner, 4: bottom of the nose), in the
# unit face box, before padding (get_face_chip_details, interpolation.h).
DLIB5_MEAN_FACE = np.array([
    [0.8595674595992, 0.2134981538014],
    [0.6460604764104, 0.2289674387677],
    [0.1205750620789, 0.2137274526848],
    [0.3340850613712, 0.2290642403242],
    [0.4901123135679, 0.6277975316475],
], dtype=np.float64)

# MTCNN-style 5 points (image-left eye centre, image-right eye centre, nose tip,
# mouth left corner, mouth right corner) in the pixel coordinates of a 150x150
# dlib chip (padding 0.25). Derived by scripts/derive_mtcnn_template.py: on real
# faces, dlib's 68-point predictor gives eye centres (mean of points 36-41 and
# 42-47), nose tip (30) and mouth corners (48, 54); each point is mapped into that
# face's dlib chip with the inverse of dlib_chip_transform(its 5-point shape), and
# the template is the mean over 41 frontal faces (HOG score >= 0.5, box >= 60 px):
# t1.jpg, Tom Hanks, astronaut and dlib's examples/faces photos. Per-point std:
# eyes ~1.5 px, nose ~6 px, mouth ~6 px (pose and expression).
MTCNN_TEMPLATE_150 = np.array([
    [46.8415, 45.9001],   # left eye centre
    [99.8537, 46.1132],   # right eye centre
    [73.3712, 75.2165],   # nose tip
    [49.1775, 104.4959],  # mouth left corner
    [99.6927, 104.5520],  # mouth right corner
], dtype=np.float64)


# --------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------


def _dlib_rect_transform(sim: np.ndarray, size: int) -> np.ndarray:
    """dlib's chip_details(chip_pts, img_pts, dims): rebuild the chip->image map from
    the rectangle (centre = sim(size/2), side = size*scale - 1 between corner pixels)."""
    col = sim[:, 0]
    scale = float(np.hypot(*col))
    angle = math.atan2(col[1], col[0])
    centre = sim[:, :2] @ np.array([size / 2.0, size / 2.0]) + sim[:, 2]
    step = (size * scale - 1.0) / (size - 1)  # image distance between adjacent chip pixels
    c, s = math.cos(angle), math.sin(angle)
    lin = step * np.array([[c, -s], [s, c]])
    m = np.empty((2, 3))
    m[:, :2] = lin
    m[:, 2] = centre - lin @ np.array([(size - 1) / 2.0, (size - 1) / 2.0])
    return m


def dlib_chip_transform(points5_dlib: np.ndarray, size: int = CHIP_SIZE,
                        padding: float = CHIP_PADDING) -> np.ndarray:
    """Chip-pixel -> image-pixel 2x3 matrix of dlib's
    ``get_face_chip_details(shape5, size, padding)``."""
    pts = np.asarray(points5_dlib, dtype=np.float64).reshape(5, 2)
    chip_pts = (padding + DLIB5_MEAN_FACE) / (2 * padding + 1) * size
    return _dlib_rect_transform(similarity_transform(chip_pts, pts), size)


def invert_affine(m: np.ndarray) -> np.ndarray:
    """Inverse of a 2x3 affine matrix."""
    full = np.vstack([m, [0.0, 0.0, 1.0]])
    return np.linalg.inv(full)[:2]


def roll_angle(landmarks5: np.ndarray) -> float:
    """In-plane rotation in degrees of the eye line (MTCNN order: image-left eye
    first); positive when the image-right eye is lower."""
    pts = np.asarray(landmarks5, dtype=np.float64).reshape(5, 2)
    dx, dy = pts[1] - pts[0]
    return math.degrees(math.atan2(dy, dx))


# --------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------

_PYR = np.array([1, 4, 6, 4, 1], dtype=np.uint32)


def pyramid_down2(img: np.ndarray) -> np.ndarray:
    """dlib ``pyramid_down<2>`` on an RGB uint8 image: 5-tap [1 4 6 4 1] filter on the
    valid region, every second pixel, integer sum // 256. Output pixel (i, j) is
    centred on input (2i+2, 2j+2)."""
    h, w = img.shape[:2]
    if h <= 8 or w <= 8:
        return np.zeros((0, 0, img.shape[2]), np.uint8)
    oh, ow = (h - 3) // 2, (w - 3) // 2
    src = img.astype(np.uint32)
    rows = sum(_PYR[k] * src[:, k:k + 2 * ow:2] for k in range(5))
    out = sum(_PYR[k] * rows[k:k + 2 * oh:2] for k in range(5))
    return (out // 256).astype(np.uint8)


def _point_down(m: np.ndarray, levels: int) -> np.ndarray:
    """Compose an image-space affine map with ``levels`` dlib pyramid point_down steps
    (p/2 - (1.25, 0.75))."""
    m = m.copy()
    for _ in range(levels):
        m = m / 2.0
        m[:, 2] -= (1.25, 0.75)
    return m


def _rect_area_down(side: float, levels: int) -> float:
    # dlib drectangle width is r - l + 1; rect_down halves r - l.
    span = side - 1.0
    for _ in range(levels):
        span /= 2.0
    return (span + 1.0) ** 2


def extract_chip(image: np.ndarray, chip_to_image: np.ndarray, size: int) -> np.ndarray:
    """Cut a ``size`` x ``size`` chip, dlib-style (pyramid for big faces, bilinear,
    truncation to uint8, black outside the image)."""
    m = np.asarray(chip_to_image, dtype=np.float64)
    step = float(np.hypot(*m[:, 0]))
    side = step * (size - 1) + 1.0  # dlib rect width in image pixels
    depth = 0
    while _rect_area_down(side, depth + 1) > size * size:
        depth += 1
    h, w = image.shape[:2]
    corners = np.array([[0, 0, 1], [size - 1, 0, 1], [0, size - 1, 1], [size - 1, size - 1, 1]],
                       dtype=np.float64) @ m.T
    grow = 2.0
    for _ in range(depth):
        grow = grow * 2 + 2
    lo = np.maximum(np.round(corners.min(0) - grow), 0).astype(int)
    hi = np.minimum(np.round(corners.max(0) + grow), [w - 1, h - 1]).astype(int)
    if np.any(hi < lo):
        return np.zeros((size, size, 3), np.uint8)
    sub = image[lo[1]:hi[1] + 1, lo[0]:hi[0] + 1]
    m = m.copy()
    m[:, 2] -= lo
    for _ in range(depth):
        sub = pyramid_down2(sub)
    m = _point_down(m, depth)
    if sub.shape[0] < 2 or sub.shape[1] < 2:
        return np.zeros((size, size, 3), np.uint8)
    chip = cv2.warpAffine(sub.astype(np.float32), m, (size, size),
                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    # dlib leaves pixels black when the 2x2 neighbourhood is not inside the image.
    grid = np.mgrid[0:size, 0:size].astype(np.float64)
    xs = m[0, 0] * grid[1] + m[0, 1] * grid[0] + m[0, 2]
    ys = m[1, 0] * grid[1] + m[1, 1] * grid[0] + m[1, 2]
    inside = (xs >= 0) & (ys >= 0) & (np.floor(xs) + 1 < sub.shape[1]) & (np.floor(ys) + 1 < sub.shape[0])
    chip[~inside] = 0
    return np.floor(np.clip(chip, 0, 255)).astype(np.uint8)


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def _check_points(points: np.ndarray, name: str, shape: tuple[int | None, ...]) -> np.ndarray:
    arr = np.asarray(points)
    ok = arr.ndim == len(shape) and all(s is None or a == s for a, s in zip(arr.shape, shape))
    if not ok:
        want = "[" + ", ".join("K" if s is None else str(s) for s in shape) + "]"
        raise InvalidInputError(name, f"expected shape {want}, got {list(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isfinite(arr)):
        raise InvalidInputError(name, "must hold finite numbers")
    return arr.astype(np.float64)


def align_dlib5(image: np.ndarray, points5: np.ndarray) -> np.ndarray:
    """dlib's 150x150 chip from dlib's 5-point shape (same as
    ``dlib.get_face_chip(img, shape, 150, 0.25)`` up to interpolation rounding)."""
    check_rgb_array(image, "image")
    pts = _check_points(points5, "points5", (5, 2))
    return extract_chip(image, dlib_chip_transform(pts), CHIP_SIZE)


def mtcnn_template(size: int = CHIP_SIZE) -> np.ndarray:
    """The MTCNN-style 5-point template in pixel coordinates of a ``size`` chip
    (pixel centres at integers, so scaling is about the chip's outer corner)."""
    return (MTCNN_TEMPLATE_150 + 0.5) * (size / CHIP_SIZE) - 0.5


def align_faces(image: np.ndarray, landmarks: np.ndarray, size: int = CHIP_SIZE) -> np.ndarray:
    """Chips ``uint8[K, size, size, 3]`` in dlib's layout from MTCNN-order landmarks
    ``[K, 5, 2]`` (image-left eye, image-right eye, nose tip, mouth left, mouth right)."""
    check_rgb_array(image, "image")
    pts = _check_points(landmarks, "landmarks", (None, 5, 2))
    if size < 8:
        raise InvalidInputError("size", f"must be >= 8, got {size}")
    template = mtcnn_template(size)
    chips = np.empty((len(pts), size, size, 3), np.uint8)
    for i, face in enumerate(pts):
        chips[i] = extract_chip(image, similarity_transform(template, face), size)
    return chips
