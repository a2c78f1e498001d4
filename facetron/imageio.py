"""Image loading and atomic writing.

All images inside facetron are RGB ``uint8`` arrays of shape ``[H, W, 3]``.
Loading applies EXIF orientation, converts grayscale/RGBA/palette images to
RGB, and rejects corrupt, empty and oversized inputs with an error naming the
input and the rule.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from facetron.atomic import atomic_write_bytes
from facetron.errors import InvalidInputError

MAX_SIDE = 8192
"""Largest accepted image side in pixels (bigger inputs are refused)."""

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

Source = Union[str, os.PathLike, bytes]


def _open(source: Source, name: str) -> Image.Image:
    try:
        if isinstance(source, (bytes, bytearray)):
            if len(source) == 0:
                raise InvalidInputError(name, "is empty (0 bytes), expected an encoded image")
            img = Image.open(io.BytesIO(source))
        else:
            path = Path(source)
            if not path.is_file():
                raise InvalidInputError(name, "no such file")
            if path.stat().st_size == 0:
                raise InvalidInputError(name, "is empty (0 bytes), expected an encoded image")
            img = Image.open(path)
        # Check the size before decoding pixels (decompression bombs).
        w, h = img.size
        if w == 0 or h == 0:
            raise InvalidInputError(name, f"has zero size ({w}x{h})")
        if max(w, h) > MAX_SIDE:
            raise InvalidInputError(name, f"is {w}x{h}; the largest accepted side is {MAX_SIDE} px")
        img.load()
        return img
    except InvalidInputError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidInputError(name, f"is not a readable image ({type(exc).__name__}: {exc})") from None


def load_image(source: Source, name: str | None = None) -> np.ndarray:
    """Decode an image file or bytes to an RGB uint8 array [H, W, 3]."""
    label = name or (str(source) if not isinstance(source, (bytes, bytearray)) else "image bytes")
    img = _open(source, label)
    img = ImageOps.exif_transpose(img)
    if img.mode != "RGB":
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(bg, rgba).convert("RGB")
        else:
            img = img.convert("RGB")
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def check_rgb_array(arr: np.ndarray, name: str) -> np.ndarray:
    """Validate an in-memory image: uint8 [H, W, 3], non-empty, within MAX_SIDE."""
    if not isinstance(arr, np.ndarray):
        raise InvalidInputError(name, f"expected a numpy array, got {type(arr).__name__}")
    if arr.dtype != np.uint8:
        raise InvalidInputError(name, f"expected dtype uint8, got {arr.dtype}")
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise InvalidInputError(name, f"expected shape [H, W, 3] (RGB), got {list(arr.shape)}")
    h, w = arr.shape[:2]
    if h == 0 or w == 0:
        raise InvalidInputError(name, f"has zero size ({w}x{h})")
    if max(h, w) > MAX_SIDE:
        raise InvalidInputError(name, f"is {w}x{h}; the largest accepted side is {MAX_SIDE} px")
    return arr


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image-suffixed files of a folder, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidInputError(str(folder), "is not a folder")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def save_image(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Encode an RGB uint8 array (format from the suffix) and write it atomically."""
    path = Path(path)
    check_rgb_array(image, str(path))
    buf = io.BytesIO()
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG"}.get(path.suffix.lower(), "PNG")
    Image.fromarray(image).save(buf, format=fmt)
    return atomic_write_bytes(path, buf.getvalue())
