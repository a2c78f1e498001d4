"""From a folder of photos of one person to a training set (FaceChain's data
processing, plus an identity-consistency check FaceChain lacks).

Per photo, each rule a small step that either passes the photo on or drops
it with a reason:

1. load (EXIF orientation applied; unreadable files are dropped, not fatal);
2. detect; no face -> drop; several faces -> keep the largest only if its
   area is at least 4x the second's (FaceChain's rule), else drop;
3. rotate upright from the eye line, re-detect, crop a square around the
   face and resize it to the training resolution;
4. quality gate (detector score, face size, blur, exposure, and from the
   5 landmarks head pose and eye openness: profiles, strongly tilted heads
   and closed eyes are dropped; :mod:`facetron.faces.quality`);
then across the set:
5. identity consistency: drop faces far from the set's identity
   (:mod:`facetron.faces.consistency`: leave-one-out cosine scores with a
   median/MAD threshold, and dlib's 0.6 same-person rule against the other
   photos and against the set's robust centre) — works for 3-5 photos;
6. optional retouch (white background, skin smoothing);
7. captions: trigger token + attributes (from the attribute head if weights
   are given, else from the user's ``--attr`` flags, else none).

The output folder is written atomically and holds ``dataset/`` (images +
``metadata.jsonl``, what ``train lora`` reads), ``reference_embedding.npy``
(mean of kept faces, L2-normalised), ``template.png`` + ``template.json``
(the fusion source: the kept photo with the best quality score
(:func:`fusion_source_score`), cropped at ``fusion_source_side`` px from
the upright photo, not the training crop), ``report.json`` and
``contact_sheet.png`` (what was kept and why each photo was dropped).
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from facetron.atomic import atomic_dir, atomic_write_bytes, atomic_write_json, check_replaceable
from facetron.errors import InvalidInputError
from facetron.faces.alignment import align_faces, roll_angle
from facetron.faces.attributes import AttributeProvider, UserAttributes
from facetron.faces.consistency import dominant_face, identity_outliers, reference_embedding
from facetron.faces.crop import square_crop
from facetron.faces.detector import FaceDetector
from facetron.faces.embedder import FaceEmbedder
from facetron.faces.quality import QualityThresholds, face_quality
from facetron.faces.retouch import smooth_skin, white_background
from facetron.imageio import IMAGE_SUFFIXES, load_image, save_image
from facetron.training.lora_config import DEFAULT_TRIGGER_TOKEN

DLIB_RULE = 0.6


class TooFewPhotosError(InvalidInputError):
    """Fewer usable photos than required; the message lists every photo's fate."""


@dataclass(frozen=True)
class PrepareConfig:
    resolution: int = 512
    crop_scale: float = 2.2  # crop side = longer face-box side x crop_scale
    face_centre_shift: float = 0.1  # move the crop centre up by this x box height (head, not chin)
    min_photos: int = 3
    dominant_ratio: float = 4.0
    quality: QualityThresholds = field(default_factory=QualityThresholds)
    consistency_k: float = 3.0  # robust sigmas below the median leave-one-out score = a stranger
    consistency_min_sigma: float = 0.02  # floor of the robust sigma (cosine units: genuine photos' spread)
    identity_distance: float = DLIB_RULE
    fusion_source_side: int = 512  # the fusion source (template.png) crop side, px
    white_background: bool = False
    smooth_skin: bool = False
    trigger_token: str = DEFAULT_TRIGGER_TOKEN


@dataclass
class PhotoResult:
    file: str
    kept: bool = False
    reason: str = ""
    roll_deg: float | None = None
    quality: dict | None = None
    identity_distance: float | None = None
    caption: str | None = None
    crop: np.ndarray | None = field(default=None, repr=False)
    landmarks: np.ndarray | None = field(default=None, repr=False)  # in crop coordinates
    descriptor: np.ndarray | None = field(default=None, repr=False)
    source: np.ndarray | None = field(default=None, repr=False)  # fusion-source crop (fusion_source_side px)
    source_landmarks: np.ndarray | None = field(default=None, repr=False)  # in source coordinates
    source_score: float | None = None  # fusion_source_score: which kept photo becomes template.png

    def drop(self, reason: str) -> "PhotoResult":
        self.kept, self.reason = False, reason
        return self

    def as_dict(self) -> dict:
        hidden = ("crop", "landmarks", "descriptor", "source", "source_landmarks")
        return {k: v for k, v in asdict(self).items() if k not in hidden}


@dataclass
class PrepareResult:
    out_dir: Path
    dataset_dir: Path
    photos: list[PhotoResult]
    reference_embedding: np.ndarray
    subject: str = "a person"  # subject_for() of the first kept photo's attributes

    @property
    def kept(self) -> list[PhotoResult]:
        return [p for p in self.photos if p.kept]


def crop_points(points: np.ndarray, box: np.ndarray, size: int, scale: float, shift: float) -> np.ndarray:
    """``points`` (x, y) of the photo in the coordinates of
    ``square_crop(photo, box, size, scale, shift)`` (the same geometry)."""
    x1, y1, x2, y2 = [float(v) for v in box]
    s = size / (max(x2 - x1, y2 - y1) * scale)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2 - shift * (y2 - y1)
    return ((np.asarray(points, np.float64) - [cx, cy]) * s + size / 2).astype(np.float32)


def frontalness(landmarks: np.ndarray) -> float:
    """1 for a frontal face, falling to 0 as the nose moves sideways from the
    eyes' midpoint by 0.35 eye distances (about 35-40 degrees of yaw)."""
    lm = np.asarray(landmarks, np.float64).reshape(5, 2)
    eye_dist = max(float(np.linalg.norm(lm[1] - lm[0])), 1e-6)
    return float(np.clip(1.0 - abs(lm[2, 0] - lm[:2, 0].mean()) / (0.35 * eye_dist), 0.0, 1.0))


def fusion_source_score(quality: dict, landmarks: np.ndarray, best_sharpness: float) -> float:
    """How good a kept photo is as the fusion source (FaceChain uses its best
    photo by a learned face-quality score; this is the classical stand-in),
    in 0..1, the product of:

    * detector confidence;
    * frontalness (:func:`frontalness`): a frontal face warps onto any pose;
    * resolution: face box side / 256 px, capped at 1 (enough for 512² portraits);
    * sharpness relative to the sharpest kept photo (variance of Laplacian);
    * exposure: 1 at mid-grey mean luma, 0.5 at the quality gate's limits.
    """
    exposure = 1.0 - 0.5 * min(1.0, abs(quality["brightness"] - 128.0) / 88.0)
    resolution = min(1.0, quality["face_px"] / 256.0)
    sharp = min(1.0, quality["sharpness"] / max(best_sharpness, 1e-6))
    return float(quality["score"] * frontalness(landmarks) * resolution * sharp * exposure)


def rotate_upright(image: np.ndarray, landmarks: np.ndarray) -> tuple[np.ndarray, float]:
    """Rotate about the eye centre so the eye line is horizontal; returns (image, roll)."""
    roll = roll_angle(landmarks)
    eyes = landmarks[:2].mean(axis=0)
    m = cv2.getRotationMatrix2D((float(eyes[0]), float(eyes[1])), roll, 1.0)
    h, w = image.shape[:2]
    return cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE), roll


def _nearest_to_centre(boxes: np.ndarray, size: int) -> int:
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    return int(np.argmin(np.linalg.norm(centres - size / 2, axis=1)))


def subject_for(attrs: dict[str, str]) -> str:
    """What captions and prompts say about the person: ``a handsome man, 30-39 years old``."""
    gender = (attrs.get("gender") or "").lower()
    noun = {"man": "a handsome man", "male": "a handsome man", "woman": "a beautiful woman",
            "female": "a beautiful woman"}.get(gender, f"a {gender}" if gender else "a person")
    parts = [noun]
    if attrs.get("age"):
        age = attrs["age"]
        parts.append(f"{age} years old" if age[0].isdigit() and "s" not in age else f"in their {age}")
    for key in sorted(set(attrs) - {"gender", "age", "source", "race"}):
        parts.append(attrs[key])
    return ", ".join(parts)


def caption_for(attrs: dict[str, str], trigger: str) -> str:
    """FaceChain-style caption: ``a photo of <tok>, a handsome man, 30-39 years old``."""
    return f"a photo of {trigger}, {subject_for(attrs)}"


class Preprocessor:
    """Runs the per-photo rules with one detector and embedder."""

    def __init__(self, config: PrepareConfig = PrepareConfig(), attributes: AttributeProvider | None = None):
        self.config = config
        self.detector = FaceDetector()
        self.embedder = FaceEmbedder()
        self.attributes = attributes or UserAttributes({})

    def photo(self, path: Path) -> PhotoResult:
        """Steps 1-4 for one photo."""
        c = self.config
        res = PhotoResult(file=path.name)
        try:
            image = load_image(path)
        except InvalidInputError as exc:
            return res.drop(f"unreadable: {exc.rule}")
        det = self.detector.detect(image)
        if len(det) == 0:
            return res.drop("no face found")
        k = dominant_face(det.boxes, c.dominant_ratio)
        if k is None:
            return res.drop(f"{len(det)} faces and the largest is not {c.dominant_ratio:g}x the second")
        upright, res.roll_deg = rotate_upright(image, det.landmarks[k])
        # re-detect on the rotated photo: the face nearest the old face's centre
        det2 = self.detector.detect(upright)
        if len(det2) == 0:
            return res.drop("face lost after rotating upright")
        centre = (det.boxes[k, :2] + det.boxes[k, 2:]) / 2
        j = int(np.argmin(np.linalg.norm((det2.boxes[:, :2] + det2.boxes[:, 2:]) / 2 - centre, axis=1)))
        crop = square_crop(upright, det2.boxes[j], c.resolution, c.crop_scale, c.face_centre_shift)
        det3 = self.detector.detect(crop)
        if len(det3) == 0:
            return res.drop("face lost after cropping")
        i = _nearest_to_centre(det3.boxes, c.resolution)
        # quality is judged on the original pixels of the face (before resampling to the crop size)
        quality = face_quality(upright, det2.boxes[j], float(det2.scores[j]), det2.landmarks[j])
        res.quality = quality.as_dict()
        failures = quality.failures(c.quality)
        if failures:
            return res.drop("quality: " + "; ".join(failures))
        res.crop, res.landmarks = crop, det3.landmarks[i]
        # the fusion source: the same framing at fusion_source_side px, from the upright photo's own pixels
        res.source = square_crop(upright, det2.boxes[j], c.fusion_source_side, c.crop_scale, c.face_centre_shift)
        res.source_landmarks = crop_points(det2.landmarks[j], det2.boxes[j], c.fusion_source_side, c.crop_scale,
                                           c.face_centre_shift)
        res.descriptor = self.embedder.descriptors(align_faces(crop, det3.landmarks[i : i + 1]))[0]
        res.kept = True
        return res

    def consistency(self, results: list[PhotoResult]) -> np.ndarray | None:
        """Step 5: drop identity outliers; returns the kept faces' reference embedding."""
        kept = [r for r in results if r.kept]
        if not kept:
            return None
        desc = np.stack([r.descriptor for r in kept])
        emb = desc / np.linalg.norm(desc, axis=1, keepdims=True)
        outliers = identity_outliers(emb, k=self.config.consistency_k, min_sigma=self.config.consistency_min_sigma,
                                     descriptors=desc, same_person=self.config.identity_distance)
        centre = np.median(desc[outliers.keep], axis=0) if outliers.keep.any() else np.median(desc, axis=0)
        for r, ok, reason in zip(kept, outliers.keep, outliers.reasons):
            r.identity_distance = round(float(np.linalg.norm(r.descriptor - centre)), 4)
            if not ok:
                r.drop(reason)
            elif r.identity_distance >= self.config.identity_distance:
                r.drop(
                    f"identity: distance {r.identity_distance:.2f} to the set's face >= {self.config.identity_distance}"
                    " (dlib's same-person rule)"
                )
        still = [r for r in kept if r.kept]
        if not still:
            return None
        d = np.stack([r.descriptor for r in still])
        return reference_embedding(d / np.linalg.norm(d, axis=1, keepdims=True))

    def finish(self, kept: list[PhotoResult]) -> str:
        """Steps 6-7: retouch and caption the kept crops (in place); returns the
        subject words of the first kept photo (for prompts)."""
        c = self.config
        for r in kept:
            if c.white_background:
                r.crop = white_background(r.crop, r.landmarks)
            if c.smooth_skin:
                r.crop = smooth_skin(r.crop, r.landmarks)
        attrs = self.attributes.predict([r.crop for r in kept])
        for r, a in zip(kept, attrs):
            r.caption = caption_for(a, c.trigger_token)
        return subject_for(attrs[0])


def contact_sheet(photos_dir: Path, results: list[PhotoResult], thumb: int = 160) -> np.ndarray:
    """Thumbnails of every input photo: green border = kept, red = dropped (+ reason)."""
    cols = min(6, max(1, len(results)))
    rows = (len(results) + cols - 1) // cols
    cell_h = thumb + 40
    sheet = np.full((rows * cell_h, cols * thumb, 3), 255, np.uint8)
    for n, r in enumerate(results):
        y, x = (n // cols) * cell_h, (n % cols) * thumb
        if r.crop is not None:
            img = r.crop
        else:
            try:
                img = load_image(photos_dir / r.file)
            except InvalidInputError:
                img = np.full((thumb, thumb, 3), 200, np.uint8)
        h, w = img.shape[:2]
        s = (thumb - 8) / max(h, w)
        small = cv2.resize(img, (max(1, int(w * s)), max(1, int(h * s))), interpolation=cv2.INTER_AREA)
        color = (40, 170, 60) if r.kept else (210, 40, 40)
        cv2.rectangle(sheet, (x + 1, y + 1), (x + thumb - 2, y + thumb - 2), color, 3)
        oy, ox = y + (thumb - small.shape[0]) // 2, x + (thumb - small.shape[1]) // 2
        sheet[oy : oy + small.shape[0], ox : ox + small.shape[1]] = small
        label = "kept" if r.kept else r.reason
        for li, text in enumerate([r.file[:26], label[:26], label[26:52]]):
            cv2.putText(sheet, text, (x + 4, y + thumb + 11 + 12 * li), cv2.FONT_HERSHEY_SIMPLEX, 0.33, (0, 0, 0) if li == 0 else color, 1)
    return sheet


def _photo_files(photos_dir: Path) -> list[Path]:
    if not photos_dir.is_dir():
        raise InvalidInputError(str(photos_dir), "is not a folder of photos")
    files = sorted(p for p in photos_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise InvalidInputError(str(photos_dir), "is empty: put photos of one person in it (" + ", ".join(IMAGE_SUFFIXES) + ")")
    return files


def check_out_dir(photos_dir: Path, out_dir: Path) -> None:
    """The output folder is neither the input folder nor inside it, and holds
    nothing facetron did not make (checked before any work)."""
    src, dst = photos_dir.resolve(), out_dir.resolve()
    if dst == src or src in dst.parents:
        raise InvalidInputError(f"--out {out_dir}", f"is inside the photo folder {photos_dir}: facetron never writes "
                                                    "into its input; choose a folder elsewhere")
    check_replaceable(out_dir, "--out")


def prepare_photos(
    photos_dir: str | Path,
    out_dir: str | Path,
    config: PrepareConfig = PrepareConfig(),
    attributes: AttributeProvider | None = None,
    progress: bool = True,
) -> PrepareResult:
    """Run the whole preprocessing; raise TooFewPhotosError (listing every
    photo and its reason) when fewer than ``config.min_photos`` survive."""
    from facetron.progress import progress_bar

    photos_dir, out_dir = Path(photos_dir), Path(out_dir)
    check_out_dir(photos_dir, out_dir)
    files = _photo_files(photos_dir)
    pre = Preprocessor(config, attributes)
    results = [pre.photo(f) for f in progress_bar(files, desc="prepare photos", unit="photo", enabled=progress)]
    reference = pre.consistency(results)
    kept = [r for r in results if r.kept]
    if len(kept) < config.min_photos:
        listing = "; ".join(f"{r.file}: {'kept' if r.kept else r.reason}" for r in results)
        raise TooFewPhotosError(
            str(photos_dir), f"{len(kept)} usable photo(s), at least {config.min_photos} needed — {listing}"
        )
    subject = pre.finish(kept)
    # the fusion source: the kept photo with the best quality score
    sharpest = max(r.quality["sharpness"] for r in kept)
    for r in kept:
        r.source_score = round(fusion_source_score(r.quality, r.source_landmarks, sharpest), 4)
    best = max(kept, key=lambda r: r.source_score)
    with atomic_dir(out_dir) as tmp:
        from facetron.training.dataset import write_dataset

        write_dataset(tmp / "dataset", [r.crop for r in kept], [r.caption for r in kept])
        buf = io.BytesIO()
        np.save(buf, reference.astype(np.float32), allow_pickle=False)
        atomic_write_bytes(tmp / "reference_embedding.npy", buf.getvalue())
        save_image(tmp / "template.png", best.source)
        atomic_write_json(tmp / "template.json", {
            "file": best.file, "landmarks": best.source_landmarks, "quality_score": best.source_score,
            "chosen_by": "fusion_source_score: detector score x frontalness x resolution x sharpness x exposure",
        })
        save_image(tmp / "contact_sheet.png", contact_sheet(photos_dir, results))
        atomic_write_json(
            tmp / "report.json",
            {
                "photos_dir": str(photos_dir),
                "config": asdict(config),
                "kept": len(kept),
                "dropped": len(results) - len(kept),
                "template": best.file,
                "fusion_source_scores": {r.file: r.source_score for r in kept},
                "attributes_source": type(pre.attributes).__name__,
                "photos": [r.as_dict() for r in results],
            },
        )
    return PrepareResult(out_dir, out_dir / "dataset", results, reference, subject)


def register_user(registry, user_id: str, result: PrepareResult, trigger_token: str = DEFAULT_TRIGGER_TOKEN) -> None:
    """Put a prepared user into the registry: reference embedding, template
    face (fusion source), and ``user.json`` (subject words, trigger token)."""
    registry.register(user_id, result.reference_embedding, result.out_dir / "template.png",
                      result.out_dir / "template.json", {"subject": result.subject, "trigger_token": trigger_token})
