"""Build, write and load Stable Diffusion 1.5-architecture base models.

A base model is a folder in diffusers layout::

    unet/  vae/  text_encoder/  tokenizer/  scheduler/  [model_index.json]

``load_base_model(DIR)`` loads one and names the part that is missing or
broken. ``ensure_tiny_model()`` writes the embedded default (built from a
fixed seed, so every machine gets the same weights) into the cache once.
No weights are ever downloaded: ``HF_HUB_OFFLINE=1`` is set before the
Hugging Face libraries load (unless the environment already says otherwise)
and every ``from_pretrained`` reads a local folder (``local_files_only=True``);
a path that is not a local diffusers folder is refused before any load.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read by huggingface_hub at import: set before diffusers loads
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import hashlib  # noqa: E402
import json  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from facetron.atomic import atomic_dir, atomic_write_json  # noqa: E402
from facetron.diffusion.clip_tokenizer import write_tokenizer_files  # noqa: E402
from facetron.diffusion.model_spec import ModelSpec, SD15_SCHEDULER, TINY, TINY_SEED  # noqa: E402
from facetron.errors import InvalidInputError, NotFoundError  # noqa: E402
from facetron.paths import cache_dir  # noqa: E402

PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SMOKE_MARKER = "facetron_smoke_model.json"


@dataclass
class BaseModel:
    """The parts of an SD-1.5-architecture model, loaded in torch."""

    path: Path
    unet: "torch.nn.Module"
    vae: "torch.nn.Module"
    text_encoder: "torch.nn.Module"
    tokenizer: object
    scheduler: object
    is_smoke_model: bool
    resolution: int

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def build_models(spec: ModelSpec, seed: int = TINY_SEED):
    """Instantiate (unet, vae, text_encoder) of ``spec`` with seeded random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**spec.unet)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**spec.vae)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**spec.text_encoder))
    return unet.eval(), vae.eval(), text_encoder.eval()


def write_base_model(spec: ModelSpec, out_dir: str | Path, seed: int = TINY_SEED) -> Path:
    """Write ``spec`` with seeded random weights as a diffusers folder (atomically)."""
    from diffusers import DDPMScheduler

    unet, vae, text_encoder = build_models(spec, seed)
    with atomic_dir(out_dir) as tmp:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        vae.save_pretrained(tmp / "vae", safe_serialization=True)
        text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        write_tokenizer_files(tmp / "tokenizer")
        DDPMScheduler(**SD15_SCHEDULER).save_pretrained(tmp / "scheduler")
        atomic_write_json(
            tmp / "model_index.json",
            {
                "_class_name": "StableDiffusionPipeline",
                "_diffusers_version": "0.42.1",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", "DDPMScheduler"],
                "safety_checker": [None, None],
                "feature_extractor": [None, None],
                "requires_safety_checker": False,
            },
        )
        atomic_write_json(
            tmp / SMOKE_MARKER,
            {
                "name": spec.name,
                "seed": seed,
                "resolution": spec.resolution,
                "smoke_model": spec.is_smoke_model,
                "note": "random weights from a fixed seed: its pictures are not portraits",
            },
        )
    return Path(out_dir)


def ensure_tiny_model() -> Path:
    """Path of the embedded tiny default, written into the cache on first use."""

    path = cache_dir("models") / f"{TINY.name}-seed{TINY_SEED}"
    if not (path / SMOKE_MARKER).is_file():
        write_base_model(TINY, path)
    return path


def check_layout(path: str | Path) -> Path:
    """Raise naming the missing part if ``path`` is not a diffusers SD folder."""
    path = Path(path)
    if not path.is_dir():
        hub_like = not path.is_absolute() and len(path.parts) == 2 and not str(path).startswith(".")
        hint = (f" ({str(path)!r} looks like a model-hub id: facetron never downloads; give the local "
                "diffusers folder, e.g. --base-model /models/stable-diffusion-v1-5)") if hub_like else \
            " (a local diffusers folder is expected: unet/ vae/ text_encoder/ tokenizer/ scheduler/)"
        raise NotFoundError(f"--base-model {path}: no such folder{hint}")
    for part in PARTS:
        sub = path / part
        if not sub.is_dir():
            raise InvalidInputError(
                f"--base-model {path}", f"missing part '{part}/' (expected diffusers layout: {', '.join(PARTS)})"
            )
    for part, cfg in (("unet", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json"),
                      ("scheduler", "scheduler_config.json"), ("tokenizer", "vocab.json")):
        if not (path / part / cfg).is_file():
            raise InvalidInputError(f"--base-model {path}", f"part '{part}/' has no {cfg}")
    return path


def load_base_model(path: str | Path | None = None, dtype: torch.dtype = torch.float32) -> BaseModel:
    """Load a base model folder (default: the tiny embedded model)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = check_layout(path if path is not None else ensure_tiny_model())
    local = {"local_files_only": True}  # never the network, whatever the environment says
    loaders = {
        "unet": lambda: UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=dtype, **local),
        "vae": lambda: AutoencoderKL.from_pretrained(path / "vae", torch_dtype=dtype, **local),
        "text_encoder": lambda: CLIPTextModel.from_pretrained(path / "text_encoder", torch_dtype=dtype, **local),
        "tokenizer": lambda: CLIPTokenizer.from_pretrained(path / "tokenizer", **local),
        "scheduler": lambda: DDPMScheduler.from_pretrained(path / "scheduler", **local),
    }
    parts = {}
    for name, load in loaders.items():
        try:
            parts[name] = load()
        except Exception as exc:  # name the part: diffusers' own errors rarely do
            raise InvalidInputError(f"--base-model {path}", f"part '{name}/' failed to load: {exc}") from None
    marker = path / SMOKE_MARKER
    smoke = marker.is_file() and json.loads(marker.read_text()).get("smoke_model", False)
    resolution = 8 * int(parts["unet"].config.sample_size) if not smoke else TINY.resolution
    for m in ("unet", "vae", "text_encoder"):
        parts[m].eval().requires_grad_(False)
    return BaseModel(path=path, is_smoke_model=bool(smoke), resolution=resolution, **parts)


def model_hash(path: str | Path) -> str:
    """sha256 (16 hex) over the UNet and text encoder weight files: identifies a base."""
    path = Path(path)
    h = hashlib.sha256()
    for part in ("unet", "text_encoder"):
        for f in sorted((path / part).glob("*.safetensors")) + sorted((path / part).glob("*.bin")):
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]
