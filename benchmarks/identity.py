"""The identity report: how much a user's generated faces look like the user.

``facetron evaluate --user ID`` renders a fixed prompt x style set through a
running server and measures, *before any fusion*, the face similarity of
what the generator made to the user's reference embedding — the face-sim
column of PuLID / PhotoMaker tables. Per sample: ``portrait_generator``
makes the pictures (fixed seeds: picture i uses seed + i), ``face_select``
scores them against the registered user by the same rules ``portrait``
ranks with (exactly one face within size bounds, cosine of the 128-D
embeddings). Everything goes through :mod:`facetron.client`.

Reported, over all samples and per style: ``mean`` and ``p10`` (10th
percentile) of the similarity over samples with exactly one face, and
``share_one_face``. Written as JSON + Markdown + a PNG grid of the samples
labelled with their similarity.

On the tiny smoke model the samples hold no faces (share 0): the report
says so; the numbers mean something with real SD-1.5 weights.
"""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from facetron.atomic import atomic_write_bytes, atomic_write_json
from facetron.benchmarks.report import markdown_table
from facetron.client.grid import draw_grid
from facetron.client.requests import portrait_request
from facetron.contract import PORTRAIT_GENERATOR
from facetron.errors import InvalidInputError
from facetron.imageio import save_image

EVAL_STYLES = ("studio", "outdoor", "business")
#: None = the style's own prompt; ``{trigger}`` is the user's trigger token (server side)
EVAL_PROMPTS: tuple[Optional[str], ...] = (
    None,
    "a close-up portrait photo of {trigger}, looking at the camera, natural light, best quality",
)
EVAL_SEED = 1000
REPORT_NAME = "identity_report"


@dataclass(frozen=True)
class EvalSettings:
    styles: tuple[str, ...] = EVAL_STYLES
    prompts: tuple[Optional[str], ...] = EVAL_PROMPTS
    num: int = 2  # pictures per (prompt, style): seeds seed .. seed + num - 1
    seed: int = EVAL_SEED
    steps: Optional[int] = None  # None: the server's default
    size: Optional[int] = None  # None: the base model's resolution
    guidance: Optional[float] = None

    def check(self) -> "EvalSettings":
        if not self.styles:
            raise InvalidInputError("--styles", "name at least one style")
        if not isinstance(self.num, int) or self.num < 1:
            raise InvalidInputError("--images-per-prompt", f"must be >= 1 pictures per prompt and style, got {self.num}")
        return self


def summarize(similarities: Sequence[Optional[float]]) -> dict:
    """mean / p10 over samples with one face (None = no such face), and the share of those."""
    sims = np.array([s for s in similarities if s is not None and math.isfinite(s)], np.float64)
    n = len(similarities)
    return {
        "samples": n,
        "one_face": int(len(sims)),
        "share_one_face": round(len(sims) / n, 4) if n else 0.0,
        "mean": round(float(sims.mean()), 4) if len(sims) else None,
        "p10": round(float(np.percentile(sims, 10)), 4) if len(sims) else None,
    }


def evaluate_identity(client, user_id: str, settings: EvalSettings = EvalSettings()) -> tuple[dict, list[np.ndarray]]:
    """Render and score the sample set through ``client`` (a FacetronClient or
    ServerPool). Returns (report, pictures in sample order)."""
    settings.check()
    rows, pictures = [], []
    for style in settings.styles:
        for p, prompt in enumerate(settings.prompts):
            # portrait_request checks the generation inputs with the server's own rules
            inputs = portrait_request(user_id, style=style, prompt=prompt, num_images=settings.num,
                                      seed=settings.seed, steps=settings.steps, height=settings.size,
                                      width=settings.size, guidance=settings.guidance)
            images = client.infer(PORTRAIT_GENERATOR.name, inputs, ["images"])["images"]
            scored = client.select(images, user_id=user_id)
            for i, (image, sim) in enumerate(zip(images, scored.similarity.tolist())):
                rows.append({"style": style, "prompt": "style" if prompt is None else f"prompt {p}",
                             "seed": settings.seed + i,
                             "similarity": round(float(sim), 4) if math.isfinite(float(sim)) else None})
                pictures.append(image)
    overall = summarize([r["similarity"] for r in rows])
    report = {
        "report": "identity (pre-fusion face similarity to the user's reference embedding)",
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "user_id": user_id,
        "how": "portrait_generator renders each (prompt, style, seed); face_select scores it against the "
               "registered user (exactly one face within size bounds; cosine of 128-D embeddings); no fusion",
        "settings": asdict(settings),
        "overall": overall,
        "by_style": {s: summarize([r["similarity"] for r in rows if r["style"] == s]) for s in settings.styles},
        "samples": rows,
        "note": ("no generated picture held exactly one face: the identity numbers are empty (the tiny smoke "
                 "model makes no faces; run it with real SD-1.5 weights)" if overall["one_face"] == 0 else
                 "similarity of what the generator made (before fusion); mean/p10 over samples with one face"),
    }
    return report, pictures


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def write_identity_report(report: dict, pictures: list[np.ndarray], out_dir: str | Path, cell: int = 160) -> dict:
    """``identity_report.json`` / ``.md`` / ``.png`` in ``out_dir``; returns their paths."""
    out = Path(out_dir)
    paths = {"json": atomic_write_json(out / f"{REPORT_NAME}.json", report)}
    table = [{"set": "all", **{k: _fmt(v) for k, v in report["overall"].items()}}]
    table += [{"set": s, **{k: _fmt(v) for k, v in stats.items()}} for s, stats in report["by_style"].items()]
    md = (f"# Identity report: {report['user_id']}\n\n{report['how']}.\n\n"
          + markdown_table(table, ["set", "samples", "one_face", "share_one_face", "mean", "p10"])
          + f"\nNote: {report['note']}.\n")
    paths["markdown"] = atomic_write_bytes(out / f"{REPORT_NAME}.md", md.encode())
    if pictures:
        labels = [f"{r['style']} {r['prompt']} s{r['seed']}\n"
                  + ("no face" if r["similarity"] is None else f"sim {r['similarity']:.3f}") for r in report["samples"]]
        cols = report["settings"]["num"] * len(report["settings"]["prompts"])
        paths["grid"] = out / f"{REPORT_NAME}.png"
        save_image(paths["grid"], draw_grid(pictures, labels, cols=cols, cell=cell))
    return paths

