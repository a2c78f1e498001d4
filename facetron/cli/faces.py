"""``facetron faces detect|embed|compare|select`` on image files and folders.

Output is JSON on stdout (one document). Files that cannot be used are
reported with a per-file ``error`` naming the rule (unreadable, no face,
several faces) instead of stopping the run; the exit code is 1 when any
file had an error, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from facetron import contract
from facetron.cli.options import add_users_dir
from facetron.errors import FacetronError, InvalidInputError
from facetron.imageio import IMAGE_SUFFIXES, list_images, load_image, save_image


def _expand(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += list_images(p)
        else:
            files.append(p)
    if not files:
        raise InvalidInputError("PATH", "no image files given (folders are searched for " + ", ".join(IMAGE_SUFFIXES) + ")")
    return files


class _Faces:
    """Loaded once per command: detector, embedder."""

    def __init__(self) -> None:
        from facetron.faces.detector import FaceDetector
        from facetron.faces.embedder import FaceEmbedder

        self.detector = FaceDetector()
        self.embedder = FaceEmbedder()

    def one_face(self, path: Path) -> tuple[np.ndarray, object]:
        """(image, detections) for a photo that must show exactly one face."""
        from facetron.faces.consistency import dominant_face

        image = load_image(path)
        det = self.detector.detect(image)
        if len(det) == 0:
            raise InvalidInputError(str(path), "no face found")
        keep = dominant_face(det.boxes)
        if keep is None:
            raise InvalidInputError(str(path), f"{len(det)} faces and none clearly dominant (need one face)")
        return image, det, keep

    def embedding(self, path: Path) -> dict:
        from facetron.faces.alignment import align_faces

        image, det, k = self.one_face(path)
        chip = align_faces(image, det.landmarks[k : k + 1])
        desc = self.embedder.descriptors(chip)[0]
        return {"box": det.boxes[k], "score": float(det.scores[k]), "descriptor": desc,
                "embedding": desc / max(float(np.linalg.norm(desc)), 1e-12)}


def _round(obj):
    if isinstance(obj, np.ndarray):
        return np.round(obj.astype(np.float64), 4).tolist()
    if isinstance(obj, float):
        return round(obj, 4)
    if isinstance(obj, dict):
        return {k: _round(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_round(v) for v in obj]
    return obj


def _emit(doc: dict) -> None:
    json.dump(_round(doc), sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")


def cmd_detect(args: argparse.Namespace) -> int:
    from facetron.faces.draw import draw_detections
    from facetron.faces.quality import face_quality

    faces = _Faces()
    results, errors = [], 0
    for path in _expand(args.paths):
        try:
            image = load_image(path)
            det = faces.detector.detect(image)
            entry = {
                "file": str(path),
                "num_faces": len(det),
                "faces": [
                    {"box": b, "score": float(s), "landmarks": lm, "quality": face_quality(image, b, s, lm).as_dict()}
                    for b, s, lm in zip(det.boxes, det.scores, det.landmarks)
                ],
            }
            if args.out:
                png = args.out / f"{path.stem}.detect.png"
                save_image(png, draw_detections(image, det.boxes, det.scores, det.landmarks))
                entry["annotated"] = str(png)
        except FacetronError as exc:
            entry, errors = {"file": str(path), "error": str(exc)}, errors + 1
        results.append(entry)
    _emit({"command": "detect", "results": results})
    return 1 if errors else 0


def cmd_embed(args: argparse.Namespace) -> int:
    faces = _Faces()
    results, errors = [], 0
    for path in _expand(args.paths):
        try:
            e = faces.embedding(path)
            results.append({"file": str(path), "box": e["box"], "score": e["score"], "embedding": e["embedding"]})
        except FacetronError as exc:
            results.append({"file": str(path), "error": str(exc)})
            errors += 1
    _emit({"command": "embed", "dim": contract.EMBEDDING_DIM, "normalised": True, "results": results})
    return 1 if errors else 0


def cmd_compare(args: argparse.Namespace) -> int:
    from facetron.faces.embedder import DLIB_SAME_PERSON_THRESHOLD

    faces = _Faces()
    a, b = faces.embedding(args.a), faces.embedding(args.b)
    distance = float(np.linalg.norm(a["descriptor"] - b["descriptor"]))
    _emit(
        {
            "command": "compare",
            "a": str(args.a),
            "b": str(args.b),
            "cosine_similarity": float(a["embedding"] @ b["embedding"]),
            "dlib_distance": distance,
            "dlib_same_person": distance < DLIB_SAME_PERSON_THRESHOLD,
            "rule": f"dlib: same person when Euclidean distance of descriptors < {DLIB_SAME_PERSON_THRESHOLD}",
        }
    )
    return 0


def _load_candidates(paths: list[Path], size: int) -> tuple[np.ndarray, list[Path]]:
    import cv2

    files = _expand(paths)
    images = []
    for p in files:
        img = load_image(p)
        images.append(cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA))
    return np.stack(images), files


def cmd_select(args: argparse.Namespace) -> int:
    if (args.reference is None) == (args.user is None):
        raise InvalidInputError("--reference/--user", "give exactly one of them")
    if args.server and args.users_dir is not None:
        raise InvalidInputError("--users-dir", "with --server the server reads its own user registry: drop one")
    images, files = _load_candidates(args.candidates, args.size)
    if args.server:
        from facetron.client import FacetronClient

        inputs = {"images": images, "top_k": np.array([args.top_k], np.int32)}
        if args.user:
            inputs["user_id"] = np.array([args.user.encode()], dtype=object)
        else:
            inputs["reference_embedding"] = _Faces().embedding(args.reference)["embedding"][None].astype(np.float32)
        with FacetronClient(args.server) as client:
            out = client.infer("face_select", inputs, ["similarity", "rank", "selected"])
        sim, rank, order, reasons = out["similarity"], out["rank"], out["selected"], [""] * len(files)
    else:
        from facetron.pipeline.net_io import pack_detections
        from facetron.pipeline.selection import select_portraits
        from facetron.users import registry_at

        faces = _Faces()
        if args.user:
            ref = registry_at(args.users_dir).reference_embedding(args.user)
        else:
            ref = faces.embedding(args.reference)["embedding"][None].astype(np.float32)
        sel, _ = select_portraits(
            images, ref, args.top_k, lambda x: pack_detections(faces.detector.detect_batch(list(x))), faces.embedder.embed
        )
        sim, rank, order, reasons = sel.similarity, sel.rank, sel.order, sel.reasons
    _emit(
        {
            "command": "select",
            "via": f"triton {args.server}" if args.server else "in-process",
            "selected": [str(files[i]) for i in order],
            "candidates": [
                {"file": str(f), "rank": int(r), "similarity": None if np.isnan(s) else float(s), "filtered": why or None}
                for f, r, s, why in zip(files, rank, sim, reasons)
            ],
        }
    )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("faces", help="face detection, embeddings, comparison, selection")
    fsub = p.add_subparsers(dest="faces_command", required=True, metavar="ACTION")

    d = fsub.add_parser("detect", help="detect faces; JSON + annotated PNGs")
    d.add_argument("paths", nargs="+", type=Path, help="image files or folders")
    d.add_argument("--out", type=Path, default=None, help="folder for annotated PNGs")
    d.set_defaults(func=cmd_detect)

    e = fsub.add_parser("embed", help="128-D identity embeddings (one face per photo)")
    e.add_argument("paths", nargs="+", type=Path, help="image files or folders (one face per photo)")
    e.set_defaults(func=cmd_embed)

    c = fsub.add_parser("compare", help="same person? cosine similarity and dlib's 0.6 rule")
    c.add_argument("a", type=Path, help="a photo of one person")
    c.add_argument("b", type=Path, help="a photo to compare with A")
    c.set_defaults(func=cmd_compare)

    s = fsub.add_parser("select", help="rank candidate images by identity to a reference")
    s.add_argument("candidates", nargs="+", type=Path, help="candidate image files or folders")
    s.add_argument("--reference", type=Path, default=None, help="a photo of the person")
    s.add_argument("--user", default=None, help="a registered user id (its reference embedding, from --users-dir; "
                                                 "with --server, the server's registry)")
    add_users_dir(s)
    s.add_argument("--top-k", type=int, default=0, help="candidates to select; 0 = all survivors")
    s.add_argument("--size", type=int, default=256, help="candidates are resized to SIZE² before selection")
    s.add_argument("--server", default=None, help="host:port: run face_select on Triton instead of in-process")
    s.set_defaults(func=cmd_select)
