"""The embedded default photo set, made from images that ship in installed
packages (no download, licences noted):

* the user: six views of scikit-image's ``astronaut`` (Eileen Collins, NASA,
  public domain) — the photo itself, a mirror image, two crops, a tilted
  view and an exposure change. They are views of ONE photo, so the trained
  identity is weak: enough to exercise the chain, not to judge quality;
* three photos the preprocessing must drop, to show its rules: a stranger
  (insightface's ``Tom_Hanks_54745.png``), a group photo (insightface's
  ``t1.jpg``) and a picture without a face (scikit-image's ``coffee``).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from facetron.assets import asset_path, package_dir
from facetron.atomic import atomic_dir, atomic_write_json
from facetron.imageio import load_image, save_image

DEMO_USER = "astronaut"


def _zoom(img: np.ndarray, factor: float, cx: float, cy: float) -> np.ndarray:
    h, w = img.shape[:2]
    m = np.array([[factor, 0, w / 2 - cx * factor], [0, factor, h / 2 - cy * factor]])
    return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)


def _rotate(img: np.ndarray, degrees: float, cx: float, cy: float) -> np.ndarray:
    m = cv2.getRotationMatrix2D((cx, cy), degrees, 1.0)
    return cv2.warpAffine(img, m, img.shape[1::-1], flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)


def _exposure(img: np.ndarray, gamma: float, gain: tuple[float, float, float]) -> np.ndarray:
    x = (img.astype(np.float32) / 255.0) ** gamma * np.array(gain, np.float32)
    return np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8)


def make_demo_photos(out_dir: str | Path) -> Path:
    """Write the demo photo folder (atomically) and a ``.sources.json`` (hidden: preprocessing skips dot files)."""
    astro = load_image(asset_path("photo_astronaut"))
    cx, cy = 215.0, 130.0  # roughly the astronaut's face centre in the 512² photo
    views = {
        "astronaut_01.png": astro,
        "astronaut_02_mirror.png": astro[:, ::-1].copy(),
        "astronaut_03_closeup.png": _zoom(astro, 1.6, cx, cy + 40),
        "astronaut_04_crop.png": _zoom(astro, 1.25, cx + 20, cy + 80),
        "astronaut_05_tilted.png": _rotate(astro, 14, cx, cy),
        "astronaut_06_warm.png": _exposure(astro, 0.85, (1.08, 1.0, 0.9)),
    }
    with atomic_dir(out_dir) as tmp:
        for name, img in views.items():
            save_image(tmp / name, img)
        save_image(tmp / "stranger_tom_hanks.png", load_image(asset_path("photo_tom_hanks")))
        save_image(tmp / "group_t1.jpg", load_image(asset_path("photo_t1")))
        save_image(tmp / "no_face_coffee.png", load_image(package_dir("skimage") / "data" / "coffee.png"))
        atomic_write_json(
            tmp / ".sources.json",
            {
                "user": DEMO_USER,
                "astronaut_*": "views of scikit-image data/astronaut.png (Eileen Collins, NASA; public domain)",
                "stranger_tom_hanks.png": "insightface data/images/Tom_Hanks_54745.png (sample image shipped by insightface)",
                "group_t1.jpg": "insightface data/images/t1.jpg (sample image shipped by insightface)",
                "no_face_coffee.png": "scikit-image data/coffee.png (CC0, Rachel Michetti)",
                "note": "the six astronaut files are views of one photo: a weak identity, enough to run the chain",
            },
        )
    return Path(out_dir)
