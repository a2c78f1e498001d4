"""Checkpoints chosen by identity (FaceChain's ensemble step).

``train lora --select-by-identity N`` keeps the LoRA at N evenly spaced
training steps (:func:`facetron.training.train_lora.train_lora` with
``identity_snapshots = N``). Here each candidate:

1. renders a fixed sample set — fixed prompts (built-in styles) and fixed
   seeds, text-to-image, *before any fusion* — in-process with the
   candidate's LoRA (:func:`lora_renderer`: the diffusers pipeline's LoRA
   loader, facetron's own sampler :func:`facetron.pipeline.generation.generate`);
2. is scored with the face detector and embedder against the user's
   reference embedding, by face_select's rules (:func:`score_samples`):
   ``share_one_face`` (samples with exactly one face within size bounds),
   ``mean_similarity`` (over those samples) and ``score`` = their product
   (the mean over all samples, a sample without one face counting 0);
3. the best ``score`` wins (ties: the later step, the longer-trained LoRA);
   :func:`install_selection` copies it over the output LoRA and installs it
   into the user registry as one atomic version switch;
4. :func:`write_selection` writes ``identity_selection.json`` + ``.md`` (the
   table) and ``identity_selection.png`` (a contact sheet: one row per
   candidate, its samples labelled with their similarity).

On the tiny smoke model the samples are noise with no face: every score is
0 and the choice falls to the tie-break. The table says so; the scores mean
something only with real SD-1.5 weights.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from facetron.atomic import atomic_write_bytes, atomic_write_json
from facetron.contract import DEFAULT_GUIDANCE, FaceSelectParams, UnetParams
from facetron.diffusion.styles import get_style, style_prompt
from facetron.errors import InvalidInputError
from facetron.imageio import save_image
from facetron.pipeline.selection import DetectFn, EmbedFn, select_portraits, select_rules

SAMPLE_STYLES = ("studio", "outdoor")  # fixed prompts: these built-in styles' prompt templates
SAMPLE_SEEDS = 2  # per prompt: seeds SAMPLE_SEED, SAMPLE_SEED + 1 (image i uses seed + i)
SAMPLE_SEED = 20230828
SAMPLE_STEPS = 20
SELECTION_FILE = "identity_selection"

Render = Callable[[Path], np.ndarray]  # candidate LoRA file -> samples uint8 [S, H, W, 3]
SheetFn = Callable[[list, list, int, int], np.ndarray]  # (images, labels, cols, cell) -> RGB grid


@dataclass(frozen=True)
class SampleSpec:
    """The fixed sample set every candidate renders."""

    styles: tuple[str, ...] = SAMPLE_STYLES
    seeds: int = SAMPLE_SEEDS
    seed: int = SAMPLE_SEED
    steps: int = SAMPLE_STEPS
    guidance: float = DEFAULT_GUIDANCE
    size: Optional[int] = None  # None: the base model's resolution

    def prompts(self, trigger: str, subject: str) -> list[tuple[str, str]]:
        """(prompt, negative prompt) per style."""
        return [(style_prompt(get_style(s), trigger, subject), get_style(s).negative) for s in self.styles]


@dataclass
class CandidateScore:
    step: int
    lora: str
    samples: int
    one_face: int
    share_one_face: float
    mean_similarity: Optional[float]  # over samples with exactly one face (None: no such sample)
    score: float  # share_one_face x mean_similarity (0 without faces)
    similarities: list[Optional[float]] = field(default_factory=list)  # per sample (None: filtered)


@dataclass
class IdentitySelection:
    rows: list[CandidateScore]
    best: int  # index into rows
    spec: SampleSpec
    smoke_model: bool
    samples: list[np.ndarray] = field(default_factory=list, repr=False)  # per row: uint8 [S, H, W, 3]

    @property
    def best_row(self) -> CandidateScore:
        return self.rows[self.best]

    def note(self) -> str:
        if self.smoke_model:
            return ("tiny smoke model: its samples are noise and hold no face, so every score is noise (here: 0) and "
                    "the choice falls to the tie-break (the latest step); the scores mean something only with real "
                    "SD-1.5 weights")
        if not any(r.one_face for r in self.rows):
            return "no candidate's samples held a face: the choice fell to the tie-break (the latest step)"
        return "the candidate whose pre-fusion samples look most like the user (mean similarity x share with one face)"

    def as_dict(self) -> dict:
        return {
            "selected": {"step": self.best_row.step, "lora": self.best_row.lora, "score": self.best_row.score},
            "rule": "argmax of score = share_one_face x mean_similarity (ties: the later step)",
            "note": self.note(),
            "smoke_model": self.smoke_model,
            "samples": asdict(self.spec),
            "candidates": [asdict(r) for r in self.rows],
        }


def check_candidates_count(n: int, name: str = "--select-by-identity") -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InvalidInputError(name, f"must be a number of checkpoints >= 1, got {n!r}")
    return n


def score_samples(images: np.ndarray, reference: np.ndarray, detect: DetectFn, embed: EmbedFn) -> dict:
    """Identity of rendered samples (module docstring, step 2)."""
    selection, _ = select_portraits(images, np.asarray(reference, np.float32).reshape(1, -1), 0, detect, embed,
                                    select_rules(FaceSelectParams()))
    sims = selection.similarity
    ok = np.isfinite(sims)
    share = float(ok.mean()) if len(sims) else 0.0
    mean = float(sims[ok].mean()) if ok.any() else None
    return {
        "samples": int(len(sims)),
        "one_face": int(ok.sum()),
        "share_one_face": round(share, 4),
        "mean_similarity": None if mean is None else round(mean, 4),
        "score": round(share * mean, 4) if mean is not None else 0.0,
        "similarities": [round(float(s), 4) if math.isfinite(float(s)) else None for s in sims],
    }


def choose(rows: Sequence[CandidateScore]) -> int:
    """Index of the best row: highest score, ties to the later step."""
    return max(range(len(rows)), key=lambda i: (rows[i].score, rows[i].step))


def select_by_identity(candidates: Sequence[tuple[int, Path]], reference: np.ndarray, render: Render,
                       detect: DetectFn, embed: EmbedFn, spec: SampleSpec = SampleSpec(),
                       smoke_model: bool = False) -> IdentitySelection:
    """Render and score every candidate (step, LoRA file); pick the best."""
    if not candidates:
        raise InvalidInputError("--select-by-identity", "no candidate checkpoints to choose from")
    rows, samples = [], []
    for step, lora in candidates:
        images = render(Path(lora))
        rows.append(CandidateScore(step=int(step), lora=str(lora), **score_samples(images, reference, detect, embed)))
        samples.append(images)
    return IdentitySelection(rows, choose(rows), spec, smoke_model, samples)


def lora_renderer(base, spec: SampleSpec, trigger: str, subject: str, w_face: float = UnetParams().w_face) -> Render:
    """A :data:`Render` over the loaded base model (``facetron.diffusion.base_model.BaseModel``):
    each call loads one candidate LoRA into a diffusers pipeline (at the
    serving weight ``w_face``), renders the fixed prompts x seeds with
    facetron's sampler, and unloads it again."""
    import torch
    from diffusers import StableDiffusionPipeline

    from facetron.diffusion.nets import DiffusionNets
    from facetron.diffusion.sampler import GenerationRequest
    from facetron.pipeline.generation import generate

    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                   unet=base.unet, scheduler=base.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    scaling = float(base.vae.config.scaling_factor)
    size = spec.size or base.resolution
    prompts = spec.prompts(trigger, subject)

    def tokenize(texts: list[str]) -> np.ndarray:
        return base.tokenizer(texts, padding="max_length", max_length=base.tokenizer.model_max_length,
                              truncation=True, return_tensors="np").input_ids.astype(np.int32)

    @torch.no_grad()
    def text_encode(ids: np.ndarray) -> np.ndarray:
        return pipe.text_encoder(torch.from_numpy(ids).long())[0].float().numpy()

    @torch.no_grad()
    def unet(sample: np.ndarray, t: np.ndarray, hidden: np.ndarray) -> np.ndarray:
        return pipe.unet(torch.from_numpy(sample), torch.from_numpy(t), torch.from_numpy(hidden)).sample.numpy()

    @torch.no_grad()
    def vae_decode(latent: np.ndarray) -> np.ndarray:
        x = pipe.vae.decode(torch.from_numpy(latent) / scaling).sample
        return ((x.clamp(-1, 1) + 1) * 127.5 + 0.5).permute(0, 2, 3, 1).numpy().astype(np.uint8)

    nets = DiffusionNets(tokenize=tokenize, text_encode=text_encode, unet=unet, vae_decode=vae_decode,
                         latent_channels=int(base.unet.config.in_channels), latent_factor=base.latent_factor)
    request = GenerationRequest(num_images=spec.seeds, steps=spec.steps, guidance=spec.guidance, seed=spec.seed,
                                height=size, width=size)
    request.validate(base.latent_factor)
    scheduler_config = dict(base.scheduler.config)

    def render(lora: Path) -> np.ndarray:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="candidate")
        try:
            pipe.set_adapters(["candidate"], adapter_weights=[w_face])
            return np.concatenate([generate(nets, scheduler_config, prompt, negative, request)
                                   for prompt, negative in prompts])
        finally:
            pipe.unload_lora_weights()

    return render


def _label(row: CandidateScore, k: int) -> str:
    sim = row.similarities[k]
    return f"step {row.step}: " + ("no face" if sim is None else f"sim {sim:.3f}")


def write_selection(selection: IdentitySelection, out_dir: str | os.PathLike, sheet: SheetFn,
                    cell: int = 128) -> dict[str, Path]:
    """``identity_selection.json`` / ``.md`` (the table) and ``.png`` (the
    contact sheet, drawn by ``sheet``: one row of samples per candidate)."""
    out = Path(out_dir)
    doc = selection.as_dict()
    paths = {"json": atomic_write_json(out / f"{SELECTION_FILE}.json", doc)}
    lines = [
        "# LoRA checkpoints chosen by identity", "",
        f"Selected: step {selection.best_row.step} (`{Path(selection.best_row.lora).name}`). {doc['rule']}.", "",
        f"Note: {doc['note']}.", "",
        "| step | samples | one face | share one face | mean similarity | score | selected |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(selection.rows):
        mean = "-" if r.mean_similarity is None else f"{r.mean_similarity:.4f}"
        lines.append(f"| {r.step} | {r.samples} | {r.one_face} | {r.share_one_face:.2f} | {mean} | {r.score:.4f} | "
                     f"{'**yes**' if i == selection.best else ''} |")
    paths["markdown"] = atomic_write_bytes(out / f"{SELECTION_FILE}.md", ("\n".join(lines) + "\n").encode())
    if selection.samples:
        images = [img for batch in selection.samples for img in batch]
        labels = [_label(r, k) for r, batch in zip(selection.rows, selection.samples) for k in range(len(batch))]
        grid = sheet(images, labels, len(selection.samples[0]), cell)
        path = out / f"{SELECTION_FILE}.png"
        save_image(path, grid)
        paths["contact_sheet"] = path
    return paths


def _copy_atomic(src: Path, dst: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def install_selection(selection: IdentitySelection, lora_path: Path, metadata_path: Path, registry=None,
                      user_id: Optional[str] = None) -> Path:
    """The chosen candidate becomes the output LoRA (its sidecar records the
    choice), then, with a registry, the user's served LoRA (one new registry
    version: LoRA + sidecar switch together)."""
    best = Path(selection.best_row.lora)
    _copy_atomic(best, Path(lora_path))
    meta = json.loads(Path(metadata_path).read_text()) if Path(metadata_path).is_file() else {}
    meta["selected_by_identity"] = {k: v for k, v in selection.as_dict().items() if k != "candidates"}
    meta["selected_by_identity"]["table"] = [
        {"step": r.step, "score": r.score, "share_one_face": r.share_one_face, "mean_similarity": r.mean_similarity}
        for r in selection.rows
    ]
    atomic_write_json(metadata_path, meta)
    if registry is not None and user_id is not None:
        registry.install_lora(user_id, Path(lora_path), Path(metadata_path))
    return Path(lora_path)
