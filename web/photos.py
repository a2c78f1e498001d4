"""Uploaded photos: checked with facetron's own image rules, then staged.

Every upload is decoded with :func:`facetron.imageio.load_image` (the same
rules ``facetron train prepare`` applies: readable, non-empty, not over
8192 px), so a non-image is named before any work starts. The readable ones
are copied into a fresh folder that replaces the user's previous upload only
once it is complete: a failed upload never loses the last good one.

Before anything is decoded the upload as a whole is held to the bounds of
:mod:`facetron.web.limits` (file count, bytes per file and in total, pixels
per image read from the header): over a bound, the whole upload is refused
with one message naming the file and the bound.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from PIL import Image

from facetron.errors import InvalidInputError
from facetron.imageio import IMAGE_SUFFIXES, load_image
from facetron.web.limits import MAX_UPLOAD_FILE_BYTES, MAX_UPLOAD_FILES, MAX_UPLOAD_PIXELS, MAX_UPLOAD_TOTAL_BYTES


@dataclass
class CheckedUploads:
    """Readable photos (paths as uploaded) and the rejected ones with the reason."""

    photos: list[Path] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason)


def upload_path(item: object) -> Path:
    """A Gradio upload (a path string, or an object with ``.name`` / ``path``) as a Path."""
    if isinstance(item, (str, os.PathLike)):
        return Path(item)
    if isinstance(item, dict) and "path" in item:
        return Path(item["path"])
    name = getattr(item, "name", None) or getattr(item, "path", None)
    if name is None:
        raise InvalidInputError("photos", f"unexpected upload object {type(item).__name__}")
    return Path(name)


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.0f} MB"


def check_pixels(path: Path, name: str) -> None:
    """Refuse an image whose header declares more than MAX_UPLOAD_PIXELS (nothing is decoded)."""
    try:
        with Image.open(path) as img:
            w, h = img.size
    except Exception:  # not an image: load_image names it with its own rule
        return
    if w * h > MAX_UPLOAD_PIXELS:
        raise InvalidInputError(name, f"is {w}x{h} = {w * h / 1e6:.1f} MP; at most {MAX_UPLOAD_PIXELS / 1e6:.0f} MP "
                                      "per image (scale it down)")


def check_bounds(paths: list[Path]) -> None:
    """The upload as a whole within the bounds: file count, bytes per file and in total (from the file sizes)."""
    if len(paths) > MAX_UPLOAD_FILES:
        raise InvalidInputError("photos", f"{len(paths)} files uploaded; at most {MAX_UPLOAD_FILES} per prepare")
    total = 0
    for path in paths:
        size = path.stat().st_size if path.is_file() else 0
        if size > MAX_UPLOAD_FILE_BYTES:
            raise InvalidInputError(path.name, f"is {_mb(size)}; at most {_mb(MAX_UPLOAD_FILE_BYTES)} per file")
        total += size
    if total > MAX_UPLOAD_TOTAL_BYTES:
        raise InvalidInputError("photos", f"the {len(paths)} files are {_mb(total)} together; at most "
                                          f"{_mb(MAX_UPLOAD_TOTAL_BYTES)} per prepare")


def check_uploads(items: Iterable[object] | None) -> CheckedUploads:
    """Sort uploads into readable photos and rejected files (with the rule they broke); an upload over
    a bound of :mod:`facetron.web.limits` is refused whole (InvalidInputError)."""
    out = CheckedUploads()
    paths = [upload_path(item) for item in items or []]
    check_bounds(paths)
    for path in paths:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            out.rejected.append((path.name, f"not an image file type (accepted: {', '.join(IMAGE_SUFFIXES)})"))
            continue
        check_pixels(path, path.name)
        try:
            load_image(path, path.name)
        except InvalidInputError as exc:
            out.rejected.append((path.name, exc.rule))
            continue
        out.photos.append(path)
    return out


def require_photos(checked: CheckedUploads) -> None:
    """Raise naming every rejected file when no readable photo is left."""
    if checked.photos:
        return
    if not checked.rejected:
        raise InvalidInputError("photos", "no photos uploaded: add 3 or more photos of one person (JPEG, PNG, ...)")
    why = "; ".join(f"{name}: {reason}" for name, reason in checked.rejected)
    raise InvalidInputError("photos", f"none of the uploaded files is a readable image ({why})")


def stage_photos(photos: list[Path], dest: Path) -> Path:
    """Copy ``photos`` into ``dest`` (replaced whole, only once the copy is complete)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        used: set[str] = set()
        for i, src in enumerate(photos):
            name = src.name if src.name not in used else f"{i:02d}_{src.name}"
            used.add(name)
            shutil.copyfile(src, tmp / name)
        old = dest.with_name(f".{dest.name}.old")
        if dest.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
