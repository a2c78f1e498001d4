"""Derive facetron.faces.alignment.MTCNN_TEMPLATE_150 from real faces (dev-time only).

For each frontal face found by dlib's HOG detector:

1. dlib's 5-point predictor gives the shape dlib itself uses to cut the chip;
   ``dlib_chip_transform`` turns it into the chip->image map of
   ``get_face_chip(img, shape, 150, 0.25)``;
2. dlib's 68-point predictor (iBUG 300-W, NON-COMMERCIAL: used here only to
   measure five numbers, it is never shipped or run by facetron) gives the
   MTCNN-style points: eye centres = mean of points 36-41 and 42-47, nose tip =
   30, mouth corners = 48 and 54;
3. those points are mapped into chip pixels with the inverse map.

The template is the mean over all faces. Run:

    .venv/bin/python scripts/derive_mtcnn_template.py [--extra DIR ...]

(``--extra`` adds folders of photos, e.g. dlib's ``examples/faces``.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import dlib
import numpy as np

from facetron.assets import asset_path
from facetron.faces.alignment import dlib_chip_transform, invert_affine
from facetron.imageio import list_images, load_image

BUILTIN = ("photo_t1", "photo_tom_hanks", "photo_astronaut")


def mtcnn_points_from_68(p68: np.ndarray) -> np.ndarray:
    """The 5 MTCNN-order points from an iBUG 68-point shape [68, 2]."""
    return np.stack([p68[36:42].mean(0), p68[42:48].mean(0), p68[30], p68[48], p68[54]])


def shape_points(shape) -> np.ndarray:
    return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)


def faces_in(img: np.ndarray, det, min_score: float, min_width: int) -> list:
    rects, scores, _ = det.run(img, 1, 0.0)
    return [r for r, s in zip(rects, scores) if s >= min_score and r.width() >= min_width]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--extra", nargs="*", default=[], help="folders with more photos")
    ap.add_argument("--min-width", type=int, default=60, help="smallest detection box (px)")
    ap.add_argument("--min-score", type=float, default=0.5, help="smallest HOG detection score")
    args = ap.parse_args()

    det = dlib.get_frontal_face_detector()
    sp5 = dlib.shape_predictor(str(asset_path("dlib_shape5")))
    sp68 = dlib.shape_predictor(str(asset_path("dlib_shape68")))

    photos: list[tuple[str, Path]] = [(n, asset_path(n)) for n in BUILTIN]
    for folder in args.extra:
        photos += [(p.name, p) for p in list_images(folder)]

    pts_chip = []
    for label, path in photos:
        img = load_image(path)
        for rect in faces_in(img, det, args.min_score, args.min_width):
            inv = invert_affine(dlib_chip_transform(shape_points(sp5(img, rect))))
            five = mtcnn_points_from_68(shape_points(sp68(img, rect)))
            pts_chip.append(five @ inv[:, :2].T + inv[:, 2])
            print(f"{label:32s} box {rect.width():4d}px  " +
                  " ".join(f"({x:6.2f},{y:6.2f})" for x, y in pts_chip[-1]))

    arr = np.stack(pts_chip)
    mean, std = arr.mean(0), arr.std(0)
    print(f"\n{len(arr)} faces; per-point std (px): " +
          " ".join(f"({x:.2f},{y:.2f})" for x, y in std))
    print("\nMTCNN_TEMPLATE_150 = np.array([")
    for name, (x, y) in zip(("left eye", "right eye", "nose tip", "mouth left", "mouth right"), mean):
        print(f"    [{x:.4f}, {y:.4f}],  # {name}")
    print("], dtype=np.float64)")


if __name__ == "__main__":
    main()
