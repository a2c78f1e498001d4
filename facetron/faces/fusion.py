"""Face fusion that blends: the user's face laid over a generated face.

FaceChain fuses the user's best photo into each generated portrait with a
learned face-fusion model. facetron's classical version keeps what the
generator made (pose, expression, lighting) and moves identity in by a
``strength`` in [0, 1]:

1. warp the user's face onto the generated face: a least-squares
   similarity places the photo, a thin-plate spline over the face pins the
   user's 5 landmarks and face outline onto the generated face's (its pose
   and expression stay);
2. mask: a polygon through points placed relative to the generated face's
   landmarks (brows to chin, inside the cheeks: no larger than the face),
   feathered *inwards* (alpha is 0 on the polygon's rim and reaches 1 at
   ``feather`` x the eye distance inside it), cut to where the warped
   photo has pixels;
3. colour-match the warped face to the generated face in CIE Lab inside the
   mask (per channel mean and spread, Reinhard et al. 2001; towards the rim
   also the local mean), so the blend takes the generated picture's skin
   tone and lighting and shows no colour step at its rim;
4. blend: ``out = generated x (1 - s x alpha) + matched x s x alpha``.
   ``s = 0`` returns the generated picture unchanged; ``s = 1`` shows the
   user's (colour-matched) face in the mask's core.

Landmarks are MTCNN's 5 points (left eye, right eye, nose, mouth left,
mouth right) as (x, y) pixels. A learned face-region model (e.g. a face
mesh) can replace :func:`face_blend_mask`; the rest stays. (MediaPipe's
1.2.2 wheel was checked: it ships no face-mesh model file, only code that
loads a separately downloaded ``face_landmarker.task``.)
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from facetron.contract import check_fusion_strength
from facetron.errors import InvalidInputError
from facetron.faces.alignment import MTCNN_TEMPLATE_150
from facetron.faces.alignment_math import similarity_transform

#: The face polygon in face units: origin between the eyes, x along the eye
#: line (left -> right eye), y towards the mouth, 1 = the eye distance. With
#: MTCNN's canonical landmarks (eyes at y 0, mouth at y 1.10) it runs from
#: the brows (y -0.5) to above the chin tip (y 1.52) and stays inside the
#: cheeks (|x| <= 0.8; MTCNN's face box is about 2.1 eye distances wide).
FACE_POLYGON = np.array([
    [-0.78, -0.30], [-0.45, -0.45], [0.00, -0.50], [0.45, -0.45], [0.78, -0.30],
    [0.80, 0.35], [0.70, 1.00], [0.42, 1.40], [0.00, 1.52],
    [-0.42, 1.40], [-0.70, 1.00], [-0.80, 0.35],
], dtype=np.float64)
_EYE_MID = (MTCNN_TEMPLATE_150[0] + MTCNN_TEMPLATE_150[1]) / 2
_EYE_DIST = float(np.linalg.norm(MTCNN_TEMPLATE_150[1] - MTCNN_TEMPLATE_150[0]))

OUTLINE_SCALE = 1.3  # the warp's outline points: the polygon enlarged, just outside the mask
DEFAULT_FEATHER = 0.3  # alpha ramps from 0 at the rim to 1 this many eye distances inside
MAX_STD_RATIO = 2.0  # colour match: the spread is scaled by at most this factor (or 1/this)
RIM_SIGMA = 0.15  # colour match: the rim's local colour, from a Gaussian this wide (x eye distance)


@dataclass(frozen=True)
class FusionResult:
    image: np.ndarray  # uint8 [H, W, 3]
    alpha: np.ndarray  # float32 [H, W]: the blend weight used (strength x mask)


def _landmarks(points: np.ndarray, name: str) -> np.ndarray:
    lm = np.asarray(points, dtype=np.float64)
    if lm.shape != (5, 2) or not np.isfinite(lm).all():
        raise InvalidInputError(name, f"expected 5 finite (x, y) landmarks, got shape {list(lm.shape)}")
    return lm


def eye_distance(landmarks: np.ndarray) -> float:
    lm = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    return float(np.linalg.norm(lm[1] - lm[0]))


def _affine_fit(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 least-squares affine map of ``src`` points onto ``dst``."""
    a = np.hstack([src, np.ones((len(src), 1))])
    coef, *_ = np.linalg.lstsq(a, dst, rcond=None)
    return coef.T


def face_polygon(landmarks: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """:data:`FACE_POLYGON` (x ``scale`` about its centre) placed on a face:
    float64 [P, 2] pixels. An affine fit of the canonical landmarks onto
    ``landmarks`` places it, so it follows the face's position, size, roll
    and (as a narrowing) its yaw."""
    lm = _landmarks(landmarks, "landmarks")
    centre = FACE_POLYGON.mean(0)
    canon = ((FACE_POLYGON - centre) * scale + centre) * _EYE_DIST + _EYE_MID
    m = _affine_fit(MTCNN_TEMPLATE_150, lm)
    return canon @ m[:, :2].T + m[:, 2]


def face_blend_mask(shape: tuple[int, ...], landmarks: np.ndarray, feather: float = DEFAULT_FEATHER) -> np.ndarray:
    """float32 [H, W] in 0..1: the face polygon, feathered inwards (0 on and
    outside its rim, 1 from ``feather`` x eye distance inside). Its support
    never leaves the polygon, so the blend never reaches past the face."""
    h, w = shape[:2]
    poly = np.round(face_polygon(landmarks) * 4).astype(np.int32)  # 2 fractional bits
    inside = np.zeros((h, w), np.uint8)
    cv2.fillPoly(inside, [poly], 255, lineType=cv2.LINE_8, shift=2)
    if not inside.any():
        return np.zeros((h, w), np.float32)
    # distance to the rim (pixels outside the image count as outside the face)
    padded = cv2.copyMakeBorder(inside, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]
    ramp = max(feather * eye_distance(landmarks), 1.0)
    t = np.clip(dist / ramp, 0.0, 1.0)
    return (t * t * (3.0 - 2.0 * t)).astype(np.float32)  # smoothstep: no visible edge at either end


def _tps_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    return np.where(d2 > 0, d2 * np.log(np.maximum(d2, 1e-12)), 0.0)


def thin_plate_map(dst_points: np.ndarray, src_points: np.ndarray, xs: np.ndarray, ys: np.ndarray,
                   smooth: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Thin-plate spline through ``dst_points -> src_points`` evaluated at the
    pixel grid (``xs``, ``ys``): float32 maps for ``cv2.remap``."""
    n = len(dst_points)
    scale = max(float(np.ptp(dst_points, axis=0).max()), 1.0)  # condition the system: unit-size coordinates
    p = dst_points / scale
    k = _tps_kernel(p, p) + smooth * np.eye(n)
    ph = np.hstack([np.ones((n, 1)), p])
    system = np.block([[k, ph], [ph.T, np.zeros((3, 3))]])
    rhs = np.vstack([src_points, np.zeros((3, 2))])
    coef = np.linalg.solve(system, rhs)
    grid = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float64) / scale
    mapped = _tps_kernel(grid, p) @ coef[:n] + np.hstack([np.ones((len(grid), 1)), grid]) @ coef[n:]
    return (mapped[:, 0].reshape(xs.shape).astype(np.float32), mapped[:, 1].reshape(xs.shape).astype(np.float32))


def warp_face(source: np.ndarray, source_landmarks: np.ndarray, target_landmarks: np.ndarray,
              size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The source photo warped so its face lies on ``target_landmarks``:
    (image uint8 [H, W, 3], valid float32 [H, W]).

    Around the face a least-squares similarity places the photo; over the
    face a thin-plate spline maps the generated face's 5 landmarks and its
    outline (:data:`FACE_POLYGON`, enlarged) onto the same points of the
    user's face, so the user's features land exactly where the generated
    face has its own (its expression and pose)."""
    src_lm = _landmarks(source_landmarks, "source_landmarks")
    tgt_lm = _landmarks(target_landmarks, "target_landmarks")
    m = similarity_transform(src_lm, tgt_lm)
    w, h = size
    warped = cv2.warpAffine(source, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    valid = cv2.warpAffine(np.ones(source.shape[:2], np.float32), m, (w, h), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    # the face outline, enlarged, where the spline must agree with the similarity
    ring = face_polygon(tgt_lm, scale=OUTLINE_SCALE)
    dst = np.vstack([tgt_lm, ring])
    src = np.vstack([src_lm, face_polygon(src_lm, scale=OUTLINE_SCALE)])
    x0, y0 = np.floor(ring.min(0)).astype(int)
    x1, y1 = np.ceil(ring.max(0)).astype(int) + 1
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if x1 > x0 and y1 > y0:
        xs, ys = np.meshgrid(np.arange(x0, x1, dtype=np.float64), np.arange(y0, y1, dtype=np.float64))
        map_x, map_y = thin_plate_map(dst, src, xs, ys)
        warped[y0:y1, x0:x1] = cv2.remap(source, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        valid[y0:y1, x0:x1] = cv2.remap(np.ones(source.shape[:2], np.float32), map_x, map_y, cv2.INTER_LINEAR,
                                        borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return warped, valid


def to_lab(image: np.ndarray) -> np.ndarray:
    """RGB uint8 -> CIE Lab float32 (L 0..100, a/b about -128..127)."""
    return cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)


def from_lab(lab: np.ndarray) -> np.ndarray:
    rgb = cv2.cvtColor(lab.astype(np.float32), cv2.COLOR_LAB2RGB)
    return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _weighted_stats(lab: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    wsum = max(float(weight.sum()), 1e-6)
    mean = (lab * weight[..., None]).reshape(-1, 3).sum(0) / wsum
    var = (((lab - mean) ** 2) * weight[..., None]).reshape(-1, 3).sum(0) / wsum
    return mean, np.sqrt(np.maximum(var, 1e-6))


def match_colour_lab(source: np.ndarray, target: np.ndarray, weight: np.ndarray, rim_sigma: float = 0.0) -> np.ndarray:
    """``source`` with the Lab mean and spread of ``target``, both measured
    with ``weight`` (float [H, W] in 0..1: the face, not its surroundings).

    ``rim_sigma`` > 0 (pixels) also pulls the source's local colour towards
    the target's where ``weight`` is low: the difference of the two
    pictures' local means (a Gaussian of that sigma, weighted) is added in
    proportion to ``1 - weight``, so the rim of the blend has the target's
    own shading and no step of colour."""
    src, tgt = to_lab(source), to_lab(target)
    mu_s, sd_s = _weighted_stats(src, weight)
    mu_t, sd_t = _weighted_stats(tgt, weight)
    ratio = np.clip(sd_t / sd_s, 1.0 / MAX_STD_RATIO, MAX_STD_RATIO)
    out = (src - mu_s) * ratio + mu_t
    if rim_sigma > 0:
        support = (weight > 0).astype(np.float32)
        norm = np.maximum(cv2.GaussianBlur(support, (0, 0), rim_sigma), 1e-6)[..., None]
        local = cv2.GaussianBlur((tgt - out) * support[..., None], (0, 0), rim_sigma) / norm
        out = out + local * (1.0 - weight)[..., None]
    return from_lab(out)


def fuse_face(
    target: np.ndarray,
    target_landmarks: np.ndarray,
    source: np.ndarray,
    source_landmarks: np.ndarray,
    strength: float = 1.0,
    feather: float = DEFAULT_FEATHER,
    colour_match: bool = True,
) -> FusionResult:
    """Blend the ``source`` face (the user's photo) into the face of
    ``target`` (a generated picture) at ``target_landmarks`` (module docstring)."""
    s = check_fusion_strength(strength, "strength")
    tgt_lm = _landmarks(target_landmarks, "target_landmarks")
    h, w = target.shape[:2]
    if s == 0.0:
        return FusionResult(target.copy(), np.zeros((h, w), np.float32))
    # 1. warp the user's face onto the generated face's landmarks
    warped, valid = warp_face(source, source_landmarks, tgt_lm, (w, h))
    # 2. the blend mask: face polygon, feathered inwards, where the warped photo has pixels
    mask = face_blend_mask(target.shape, tgt_lm, feather) * np.clip(valid, 0.0, 1.0)
    # 3. colour-match inside the mask (and locally at its rim)
    if colour_match and mask.max() > 0:
        warped = match_colour_lab(warped, target, mask, RIM_SIGMA * eye_distance(tgt_lm))
    # 4. blend with the strength
    alpha = (s * mask).astype(np.float32)
    out = target.astype(np.float32) * (1.0 - alpha[..., None]) + warped.astype(np.float32) * alpha[..., None]
    return FusionResult(np.clip(out + 0.5, 0, 255).astype(np.uint8), alpha)


#: pluggable fusers (a learned face-fusion model registers here): the portrait
#: path calls ``FUSERS[name](target, target_landmarks, source, source_landmarks, strength)``
FUSERS = {"blend": fuse_face}
