"""Face quality scores and the gate that uses them.

Scores are computed on the face crop resized to a fixed side, so blur and
exposure are comparable between small and large faces; pose and eye
openness are computed from the detector's 5 landmarks (MTCNN order: eyes,
nose, mouth corners). Thresholds live in :class:`QualityThresholds` (one
place); every failed rule is reported by name and value so a preprocessing
report can say why a photo was dropped.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from facetron.faces.alignment import MTCNN_TEMPLATE_150

_CROP_SIDE = 128

#: Depth of the nose tip in front of the eye centres, in eye distances, in the
#: rigid head model of :func:`head_pose`: 0.53 in insightface's 3D mean face
#: (``insightface/data/objects/meanshape_68.pkl``: point 30 against the means
#: of points 36-41 and 42-47).
NOSE_DEPTH = 0.53
_T = MTCNN_TEMPLATE_150
#: How far below the eye line the nose tip of a frontal face lies, in eye
#: distances (0.55 in ``MTCNN_TEMPLATE_150``, the mean of 41 frontal faces).
NOSE_DROP = float((_T[2, 1] - (_T[0, 1] + _T[1, 1]) / 2) / np.linalg.norm(_T[1] - _T[0]))

_EYE_SIDE = 64  # eye distance in the eye strip of eye_openness, px
_EYE_COLUMNS = 0.10  # half-width of the columns through the eye centre, eye distances
_EYE_ROWS = 0.25  # half-height of each eye's window, eye distances
_EYE_PEAK = 0.12  # the darkest row is looked for this close to the eye centre, eye distances
_EYE_PRESENCE = 1.0  # the darkest row must be this many strip standard deviations darker than the skin


@dataclass(frozen=True)
class QualityThresholds:
    """The gate's limits. Pose and eyes are set on faces that ship in the
    installed packages (``python tests/test_quality_pose.py`` prints them):

    * ``max_yaw`` 35: upright faces turned little or moderately read at most
      25 degrees (astronaut views 0-4, Grace Hopper 4, Tom Hanks 19, four of
      insightface t1's faces 1-25); t1's two three-quarter views read 36 and
      41 and scikit-image's cameraman, a near-profile, 38-47 (1.5-3x,
      mirrored or not: on a profile MTCNN puts the hidden eye at the face's
      edge, so profiles read lower than they are);
    * ``max_pitch`` 35: the upright faces read -25 to +10 (astronaut -5 to
      -11, Tom Hanks -18); a clearly bowed head (t1's third face from the
      left) reaches the chin-down stop of :func:`head_pose`, -44;
    * ``min_eye_openness`` 0.14: open eyes read 0.157-0.236 (astronaut 0.19,
      Grace Hopper behind glasses 0.185, Tom Hanks 0.169, t1's open eyes),
      lowered or shut lids 0.090-0.125 (t1's first and sixth faces, its
      laughing fourth, the astronaut with her eyes inpainted shut and a
      lash line drawn).
    """

    min_score: float = 0.90  # detector confidence
    min_face_px: float = 64.0  # shorter side of the face box, pixels
    min_sharpness: float = 40.0  # variance of Laplacian on the 128 px crop
    min_brightness: float = 40.0  # mean luma, 0..255
    max_brightness: float = 220.0
    min_contrast: float = 20.0  # std of luma
    max_yaw: float = 35.0  # |yaw|, degrees (head_pose)
    max_pitch: float = 35.0  # |pitch|, degrees (head_pose)
    min_eye_openness: float = 0.14  # eye_openness: dark band height / eye distance


@dataclass(frozen=True)
class FaceQuality:
    score: float
    face_px: float
    sharpness: float
    brightness: float
    contrast: float
    yaw: float | None = None  # degrees; None when no landmarks were given
    pitch: float | None = None  # degrees
    eye_openness: float | None = None  # eye distances

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
        if self.yaw is not None and abs(self.yaw) > t.max_yaw:
            out.append(f"turned sideways: yaw {self.yaw:+.0f} deg, |yaw| > {t.max_yaw:.0f}")
        if self.pitch is not None and abs(self.pitch) > t.max_pitch:
            out.append(f"tilted up/down: pitch {self.pitch:+.0f} deg, |pitch| > {t.max_pitch:.0f}")
        if self.eye_openness is not None and self.eye_openness < t.min_eye_openness:
            out.append(f"eyes closed: eye openness {self.eye_openness:.3f} < {t.min_eye_openness}")
        return out

    def as_dict(self) -> dict[str, float | None]:
        return {k: None if v is None else round(float(v), 3) for k, v in asdict(self).items()}


def face_crop(image: np.ndarray, box: np.ndarray, side: int = _CROP_SIDE) -> np.ndarray:
    """The box's pixels (clipped to the image) resized to ``side``²."""
    h, w = image.shape[:2]
    x1, y1, x2, y2 = np.round(np.asarray(box, dtype=np.float64)).astype(int)
    x1, y1 = max(x1, 0), max(y1, 0)
    x2, y2 = min(x2, w), min(y2, h)
    if x2 <= x1 or y2 <= y1:
        return np.zeros((side, side, 3), np.uint8)
    return cv2.resize(image[y1:y2, x1:x2], (side, side), interpolation=cv2.INTER_AREA)


def _face_axes(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(eye midpoint, unit vector along the eye line, unit vector across it
    towards the mouth, eye distance) of MTCNN-order landmarks."""
    lm = np.asarray(landmarks, np.float64).reshape(5, 2)
    eyes = lm[:2].mean(axis=0)
    dist = max(float(np.linalg.norm(lm[1] - lm[0])), 1e-6)
    along = (lm[1] - lm[0]) / dist
    across = np.array([-along[1], along[0]])
    if float((lm[3:].mean(axis=0) - eyes) @ across) < 0:
        across = -across
    return eyes, along, across, dist


def head_pose(landmarks: np.ndarray) -> tuple[float, float]:
    """(yaw, pitch) in degrees from the 5 landmarks: the classical geometric
    estimate from the nose tip's offset against the eyes (as in Gee &
    Cipolla 1994, "Determining the gaze of faces in images"), for a rigid
    head model seen in orthographic projection. The eye centres lie at
    depth 0, the nose tip :data:`NOSE_DEPTH` eye distances in front of them
    and, on a frontal face, :data:`NOSE_DROP` eye distances below the eye
    line. Measured in the eye line's frame (so roll does not enter), with
    ``x`` and ``y`` the nose's offsets from the eyes' midpoint along and
    across the eye line, in eye distances:

    * yaw: turning by ``a`` moves the nose by ``NOSE_DEPTH sin a`` while the
      eye distance shrinks by ``cos a``, so ``yaw = atan(x / NOSE_DEPTH)``.
      Positive: the nose points to image right;
    * pitch: tilting by ``b`` puts the nose ``NOSE_DROP cos b - NOSE_DEPTH sin b``
      below the eye line; ``y`` (times ``cos yaw``, undoing the yaw's
      shrinking of the eye distance) is solved for ``b``. Positive: chin up.
      Chin-down values stop at ``-atan(NOSE_DEPTH / NOSE_DROP)`` (-44 deg:
      the nose tip then lies straight below the eyes) and are the less
      certain side: a long nose reads as a slightly bowed head.

    Exact for the model turned about one axis (under both turns, yaw is
    under-stated for a bowed head); real faces differ from the model (nose
    length, landmark noise), so the values are coarse and the gate's limits
    leave room for that.
    """
    eyes, along, across, dist = _face_axes(landmarks)
    nose = np.asarray(landmarks, np.float64).reshape(5, 2)[2] - eyes
    x, y = float(nose @ along) / dist, float(nose @ across) / dist
    yaw = math.atan(x / NOSE_DEPTH)
    radius = math.hypot(NOSE_DROP, NOSE_DEPTH)
    pitch = math.acos(float(np.clip(y * math.cos(yaw) / radius, -1.0, 1.0))) - math.atan2(NOSE_DEPTH, NOSE_DROP)
    return math.degrees(yaw), math.degrees(pitch)


def _eye_strip(image: np.ndarray, landmarks: np.ndarray, side: int = _EYE_SIDE) -> np.ndarray:
    """float32 luma [side, 2*side]: the eyes warped (similarity) to
    (side/2, side/2) and (3*side/2, side/2), low-passed before shrinking."""
    lm = np.asarray(landmarks, np.float64).reshape(5, 2)
    dist = max(float(np.linalg.norm(lm[1] - lm[0])), 1e-6)
    h, w = image.shape[:2]
    # 1. the pixels around the eyes (one eye distance of margin), as luma
    x0, y0 = (np.floor(lm[:2].min(axis=0) - dist)).astype(int).clip(0)
    x1, y1 = np.ceil(lm[:2].max(axis=0) + dist).astype(int)
    x1, y1 = min(max(x1, x0 + 1), w), min(max(y1, y0 + 1), h)
    roi = image[y0:y1, x0:x1]
    gray = (cv2.cvtColor(roi, cv2.COLOR_RGB2GRAY) if roi.ndim == 3 else roi).astype(np.float32)
    # 2. the similarity z -> a z + b (complex numbers) taking the eyes to their places
    src_l, src_r = complex(lm[0, 0] - x0, lm[0, 1] - y0), complex(lm[1, 0] - x0, lm[1, 1] - y0)
    dst_l, dst_r = complex(side / 2, side / 2), complex(3 * side / 2, side / 2)
    a = (dst_r - dst_l) / (src_r - src_l) if src_r != src_l else complex(1.0, 0.0)
    b = dst_l - a * src_l
    if abs(a) < 1.0:  # shrinking: remove what the strip's pixels cannot hold
        gray = cv2.GaussianBlur(gray, (0, 0), 0.5 / abs(a))
    m = np.array([[a.real, -a.imag, b.real], [a.imag, a.real, b.imag]])
    return cv2.warpAffine(gray, m, (2 * side, side), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _half_max_width(profile: np.ndarray, peak: int) -> float:
    """Width in samples of the run around ``peak`` where ``profile`` is at
    least half its peak value, edges interpolated linearly."""
    half, n = profile[peak] / 2, len(profile)
    lo = hi = peak
    while lo > 0 and profile[lo - 1] >= half:
        lo -= 1
    while hi < n - 1 and profile[hi + 1] >= half:
        hi += 1
    left = lo - (profile[lo] - half) / (profile[lo] - profile[lo - 1]) if lo > 0 else lo - 0.5
    right = hi + (profile[hi] - half) / (profile[hi] - profile[hi + 1]) if hi < n - 1 else hi + 0.5
    return float(right - left)


def eye_openness(image: np.ndarray, landmarks: np.ndarray) -> float:
    """How open the eyes are: the height of the dark band (iris, pupil and
    lash lines) through each eye centre, in eye distances, averaged over the
    two eyes — a vertical integral projection of the eye window (the
    classical projection-function approach to eye analysis, Kanade 1973;
    Zhou & Geng 2004), no learned model.

    Per eye, on :func:`_eye_strip`: the mean luma of each row over the
    columns within 0.10 eye distances of the eye centre; darkness = the
    row profile's 90th percentile (the lids' skin) minus the profile; the
    band is the full width at half maximum around the darkest row within
    0.12 eye distances of the eye centre. An open eye shows the iris
    between the lids (0.157-0.236 on the shipped photos); lowered or shut
    lids only their lash line (0.09-0.125). An eye whose
    darkest row is less than one strip standard deviation darker than the
    skin (no eye visible, e.g. painted over) counts as 0.
    """
    strip = _eye_strip(image, landmarks)
    side = _EYE_SIDE
    rows, cols, peak = (int(round(f * side)) for f in (_EYE_ROWS, _EYE_COLUMNS, _EYE_PEAK))
    spread = max(float(strip.std()), 1e-6)
    heights = []
    for cx in (side // 2, 3 * side // 2):
        window = strip[side // 2 - rows : side // 2 + rows + 1, cx - cols : cx + cols + 1]
        profile = window.mean(axis=1)
        dark = np.percentile(profile, 90) - profile
        k = rows - peak + int(np.argmax(dark[rows - peak : rows + peak + 1]))
        if dark[k] < _EYE_PRESENCE * spread:
            heights.append(0.0)
        else:
            heights.append(_half_max_width(dark, k) / side)
    return float(np.mean(heights))


def face_quality(image: np.ndarray, box: np.ndarray, score: float, landmarks: np.ndarray | None = None) -> FaceQuality:
    """Quality scores of one detected face (``box`` = x1, y1, x2, y2); with
    its 5 ``landmarks`` (MTCNN order) also its pose (:func:`head_pose`) and
    eye openness (:func:`eye_openness`)."""
    box = np.asarray(box, dtype=np.float32)
    gray = cv2.cvtColor(face_crop(image, box), cv2.COLOR_RGB2GRAY)
    sharp = float(cv2.Laplacian(gray, cv2.CV_64F).var())
    yaw = pitch = eyes = None
    if landmarks is not None:
        yaw, pitch = head_pose(landmarks)
        eyes = eye_openness(image, landmarks)
    return FaceQuality(
        score=float(score),
        face_px=float(min(box[2] - box[0], box[3] - box[1])),
        sharpness=sharp,
        brightness=float(gray.mean()),
        contrast=float(gray.std()),
        yaw=yaw,
        pitch=pitch,
        eye_openness=eyes,
    )
