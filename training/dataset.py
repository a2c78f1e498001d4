"""Captioned image folders in the layout diffusers' training scripts read.

A dataset folder holds the images and one ``metadata.jsonl``, one JSON object
per line::

    {"file_name": "0001.png", "text": "a photo of <facetron-user>, a handsome man"}

``file_name`` is relative to the folder (sub-folders allowed, ``..`` not).
Every problem (missing folder, bad line, listed file missing, no rows) is
reported naming the folder or ``metadata.jsonl:<line>`` and the rule.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from facetron.atomic import atomic_dir, atomic_write_bytes
from facetron.contract import TOKENS
from facetron.errors import InvalidInputError, NotFoundError
from facetron.imageio import IMAGE_SUFFIXES, check_rgb_array, load_image

METADATA_FILE = "metadata.jsonl"


@dataclass(frozen=True)
class Row:
    file_name: str
    text: str
    path: Path


def read_metadata(root: str | os.PathLike) -> list[Row]:
    """Parse and check ``<root>/metadata.jsonl``; every listed file must exist."""
    root = Path(root)
    if not root.is_dir():
        raise NotFoundError(f"dataset {root}: no such folder")
    meta = root / METADATA_FILE
    if not meta.is_file():
        raise InvalidInputError(f"dataset {root}", f"has no {METADATA_FILE} (one JSON object per line: "
                                                   '{"file_name": "0001.png", "text": "a photo of ..."})')
    rows: list[Row] = []
    try:
        lines = meta.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InvalidInputError(str(meta), f"is not UTF-8 text ({exc})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{meta}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidInputError(where, f"is not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise InvalidInputError(where, "must be a JSON object with 'file_name' and 'text'")
        name, text = obj.get("file_name"), obj.get("text")
        if not isinstance(name, str) or not name:
            raise InvalidInputError(where, "needs a non-empty string 'file_name'")
        if not isinstance(text, str):
            raise InvalidInputError(where, "needs a string 'text' (the caption)")
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts:
            raise InvalidInputError(where, f"file_name {name!r} must be a path inside the dataset folder")
        if rel.suffix.lower() not in IMAGE_SUFFIXES:
            raise InvalidInputError(where, f"file_name {name!r} is not an image ({', '.join(IMAGE_SUFFIXES)})")
        path = root / rel
        if not path.is_file():
            raise InvalidInputError(where, f"lists {name!r}, which does not exist in {root}")
        rows.append(Row(file_name=name, text=text, path=path))
    if not rows:
        raise InvalidInputError(str(meta), "lists no images (zero rows)")
    return rows


def to_training_tensor(image: np.ndarray, resolution: int) -> torch.Tensor:
    """RGB uint8 [H,W,3] -> float32 [3,R,R] in [-1,1]: resize short side, centre crop."""
    img = Image.fromarray(image)
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)
    return arr / 127.5 - 1.0


def flip_decision(seed: int, index: int, epoch: int) -> bool:
    """Deterministic coin for (seed, index, epoch): same answer on every run/resume."""
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, index, epoch]).generate_state(1)[0]))
    return bool(torch.rand((), generator=g) < 0.5)


class CaptionedImages(torch.utils.data.Dataset):
    """Images resized/centre-cropped to ``resolution``, in [-1,1], with CLIP token ids.

    The horizontal flip is a seeded coin per (seed, index, epoch) — call
    :meth:`set_epoch` between epochs — so data order and augmentation can be
    replayed exactly after a resume. Items are dicts with ``pixel_values``
    (float32 [3,R,R]), ``input_ids`` (int64 [77]) and ``index``.
    """

    def __init__(self, root: str | os.PathLike, tokenizer, resolution: int, *, random_flip: bool = True,
                 seed: int = 0) -> None:
        self.root = Path(root)
        self.rows = read_metadata(self.root)
        self.tokenizer = tokenizer
        self.resolution = int(resolution)
        self.random_flip = random_flip
        self.seed = int(seed)
        self.epoch = 0
        self._ids = tokenize(tokenizer, [r.text for r in self.rows])
        self._pixels: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def captions(self) -> list[str]:
        return [r.text for r in self.rows]

    def pixel_values(self, index: int, flip: bool = False) -> torch.Tensor:
        """Image ``index`` as float32 [3,R,R] in [-1,1], mirrored if ``flip``."""
        if index not in self._pixels:
            row = self.rows[index]
            self._pixels[index] = to_training_tensor(load_image(row.path, name=str(row.path)), self.resolution)
        px = self._pixels[index]
        return torch.flip(px, dims=[2]) if flip else px

    def input_ids(self, index: int) -> torch.Tensor:
        return self._ids[index]

    def __getitem__(self, index: int) -> dict:
        flip = self.random_flip and flip_decision(self.seed, index, self.epoch)
        return {"pixel_values": self.pixel_values(index, flip), "input_ids": self.input_ids(index), "index": index}


def tokenize(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """CLIP token ids int64 [N, 77] (padded, truncated)."""
    return tokenizer(list(texts), padding="max_length", max_length=TOKENS, truncation=True,
                     return_tensors="pt").input_ids


def write_dataset(out_dir: str | os.PathLike, images: Sequence[np.ndarray], captions: Sequence[str]) -> Path:
    """Write ``images`` as ``0001.png``... plus ``metadata.jsonl`` into ``out_dir`` (atomically, replacing it)."""
    import io

    if len(images) != len(captions):
        raise InvalidInputError("captions", f"got {len(captions)} captions for {len(images)} images")
    if not images:
        raise InvalidInputError("images", "a dataset needs at least one image")
    for i, (img, text) in enumerate(zip(images, captions)):
        check_rgb_array(img, f"images[{i}]")
        if not isinstance(text, str):
            raise InvalidInputError(f"captions[{i}]", "must be a string")
    with atomic_dir(out_dir) as tmp:
        lines = []
        for i, (img, text) in enumerate(zip(images, captions), start=1):
            name = f"{i:04d}.png"
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            atomic_write_bytes(tmp / name, buf.getvalue())
            lines.append(json.dumps({"file_name": name, "text": text}, ensure_ascii=False))
        atomic_write_bytes(tmp / METADATA_FILE, ("\n".join(lines) + "\n").encode("utf-8"))
    return Path(out_dir)
