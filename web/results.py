"""A portrait answer as the web app shows it: gallery items with captions
(rank, identity similarity, seed), one row per generated candidate, and a
zip to download (the PNGs best first + ``result.json``).

Candidate ``i`` of a call is generated with ``seed + i`` (the server's rule),
so each picture can be made again from its caption.
"""

from __future__ import annotations

import json
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from facetron.atomic import atomic_file, atomic_write_bytes
from facetron.imageio import save_image

TABLE_COLUMNS = ["candidate", "seed", "similarity", "rank", "returned"]


@dataclass
class GalleryRun:
    """One generation's files on disk and what the page shows of it."""

    folder: Path
    images: list[Path]
    captions: list[str]
    rows: list[list[Any]]
    zip_path: Path
    summary: str


def _similarity(value: Optional[float]) -> str:
    return "filtered out" if value is None else f"{value:.3f}"


def candidate_rows(candidates: list[dict], seed: int) -> list[list[Any]]:
    """Table rows: candidate, seed, similarity (None = filtered out), rank (-1 = filtered), returned."""
    return [[c["index"], seed + c["index"], c["similarity"], c["rank"], "yes" if c["selected"] else "no"]
            for c in candidates]


def captions(candidates: list[dict], selected: list[int], seed: int) -> list[str]:
    by_index = {c["index"]: c for c in candidates}
    out = []
    for pos, idx in enumerate(selected):
        c = by_index.get(int(idx), {})
        out.append(f"#{pos + 1} · similarity {_similarity(c.get('similarity'))} · seed {seed + int(idx)}")
    return out


def _atomic_zip(path: Path, members: list[tuple[Path, str]]) -> Path:
    with atomic_file(path) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for src, arcname in members:
                zf.write(src, arcname)
    return path


def save_run(out_root: Path, user_id: str, result, request: dict[str, Any], seed: int) -> GalleryRun:
    """Write a portrait answer (``facetron.client.PortraitResult``) under
    ``out_root/<user>/<time>/``: portrait_NN.png best first, result.json, and a zip of both."""
    stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{int(time.time() * 1000) % 1000:03d}"
    folder = Path(out_root) / user_id / stamp
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for pos, image in enumerate(result.images):
        files.append(save_image(folder / f"portrait_{pos:02d}.png", np.ascontiguousarray(image)))
    candidates = result.candidates()
    selected = [int(i) for i in result.selected]
    doc = {
        "user_id": user_id,
        "request": request,
        "candidates": [{**c, "seed": seed + c["index"]} for c in candidates],
        "selected": selected,
        "files": [f.name for f in files],
        "report": result.report,
        "client": result.timing,
    }
    result_json = atomic_write_bytes(folder / "result.json", json.dumps(doc, indent=1, default=str).encode("utf-8"))
    zip_path = _atomic_zip(folder / f"portraits-{user_id}-{stamp}.zip",
                           [(f, f.name) for f in files] + [(result_json, "result.json")])
    kept = sum(1 for c in candidates if c["rank"] >= 0)
    best = next((c["similarity"] for c in candidates if c["rank"] == 0), None)
    summary = (f"{len(files)} portrait(s) of {len(candidates)} candidate(s) returned, {kept} passed the face check; "
               f"best identity similarity {_similarity(best)}; "
               f"{result.timing.get('client_total_s', 0):.1f} s on {result.server}.")
    if result.report.get("smoke_model"):
        summary += " Note: the server runs the tiny smoke model: its generated pixels are not portraits."
    return GalleryRun(folder, files, captions(candidates, selected, seed), candidate_rows(candidates, seed),
                      zip_path, summary)
