"""Fuse a face LoRA (and optionally a style LoRA) into the base model's weights.

``merge_loras`` computes, for every adapted layer,

    W' = W + w_face * s_face * B_face @ A_face + w_style * s_style * B_style @ A_style

with ``s = alpha / rank`` (peft's ``scaling``), in float32, in that order —
the same result as diffusers' ``load_lora_weights(adapter_name=...)`` +
``set_adapters([face, style], [w_face, w_style])`` + ``fuse_lora()``
(tests compare against both that path and a hand-written sum). Doing it
directly avoids peft wrapper layers and works for kohya files too.

``save_merged`` writes the result as a complete base-model folder
(diffusers layout: merged ``unet/`` and ``text_encoder/``, the base's
``vae/``, ``tokenizer/``, ``scheduler/`` copied), so it can be passed as
``--base-model`` to any later step.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Sequence

import torch

from facetron.atomic import atomic_dir, atomic_write_json, check_replaceable
from facetron.contract import DEFAULT_STYLE_WEIGHT, DEFAULT_W_FACE, MERGE_INFO
from facetron.diffusion.base_model import SMOKE_MARKER, model_hash
from facetron.diffusion.lora_reader import check_weight
from facetron.errors import InvalidInputError
from facetron.export.lora_files import LoraFile, check_lora_matches, load_lora

LoraSource = str | os.PathLike | LoraFile


def as_lora(source: LoraSource) -> LoraFile:
    return source if isinstance(source, LoraFile) else load_lora(source)


def lora_plan(face_lora: LoraSource, style_lora: LoraSource | None = None, w_face: float = DEFAULT_W_FACE,
              w_style: float = DEFAULT_STYLE_WEIGHT) -> list[tuple[LoraFile, float]]:
    """Load and pair each LoRA with its weight (face first, then style)."""
    plan = [(as_lora(face_lora), check_weight("--w-face", w_face))]
    if style_lora is not None:
        plan.append((as_lora(style_lora), check_weight("--w-style", w_style)))
    return plan


def fuse_into(components: dict[str, torch.nn.Module], plan: Sequence[tuple[LoraFile, float]]) -> None:
    """Add ``w * scale * B @ A`` of every planned LoRA into ``components`` in place."""
    plan = [(check_lora_matches(lora, components), w) for lora, w in plan]  # check all before touching any weight
    modules = {c: dict(m.named_modules()) for c, m in components.items() if m is not None}
    with torch.no_grad():
        for lora, weight in plan:
            for (comp, name), layer in lora.layers.items():
                w = modules[comp][name].weight
                w.copy_((w.float() + weight * layer.delta()).to(w.dtype))


def merge_loras(base_model, face_lora: LoraSource, style_lora: LoraSource | None = None,
                w_face: float = DEFAULT_W_FACE, w_style: float = DEFAULT_STYLE_WEIGHT, *,
                inplace: bool = False) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Return ``(unet, text_encoder)`` with the LoRA(s) fused in.

    ``base_model``: a :class:`facetron.diffusion.base_model.BaseModel`. Its
    modules are copied first unless ``inplace`` (saves memory at SD-1.5 size).
    The text encoder is only changed where a LoRA has text-encoder layers."""
    plan = lora_plan(face_lora, style_lora, w_face, w_style)
    unet = base_model.unet if inplace else copy.deepcopy(base_model.unet)
    needs_te = any("text_encoder" in lora.components for lora, _ in plan)
    te = base_model.text_encoder if (inplace or not needs_te) else copy.deepcopy(base_model.text_encoder)
    fuse_into({"unet": unet, "text_encoder": te}, plan)
    return unet.eval(), te.eval()


def merge_provenance(base_model, plan: Sequence[tuple[LoraFile, float]], roles: Sequence[str] = ("face", "style")) -> dict:
    """What went into a merge: base model path + hash, each LoRA with its weight."""

    return {
        "base_model": {"path": str(Path(base_model.path).resolve()), "model_hash": model_hash(base_model.path),
                       "smoke_model": bool(base_model.is_smoke_model)},
        "loras": [dict(lora.describe(), role=role, weight=w) for (lora, w), role in zip(plan, roles)],
        "formula": "W + sum_i w_i * (alpha_i / r_i) * B_i @ A_i (float32, face then style)",
    }


def ensure_writable_dir(path: str | os.PathLike, name: str = "--out") -> Path:
    """Fail early, naming ``path``, if a folder cannot be created there."""
    path = Path(path)
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidInputError(f"{name} {path}", f"cannot create its parent folder ({exc.strerror or exc})") from None
    if path.exists() and not path.is_dir():
        raise InvalidInputError(f"{name} {path}", "exists and is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidInputError(f"{name} {path}", f"folder {parent} is not writable")
    return check_replaceable(path, name)


def save_merged(base_model, unet: torch.nn.Module, text_encoder: torch.nn.Module, out_dir: str | os.PathLike,
                provenance: dict | None = None) -> Path:
    """Write a complete diffusers-layout model folder with the merged weights (atomically).

    ``unet/`` and ``text_encoder/`` hold the merged safetensors; ``vae/``,
    ``tokenizer/``, ``scheduler/``, ``model_index.json`` (and the smoke-model
    marker) are copied from the base folder. ``facetron_merge.json`` records
    the provenance. Nothing appears under ``out_dir`` unless all of it was written."""

    out = ensure_writable_dir(out_dir)
    base = Path(base_model.path)
    try:
        with atomic_dir(out) as tmp:
            unet.save_pretrained(tmp / "unet", safe_serialization=True)
            text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
            for part in ("vae", "tokenizer", "scheduler"):
                shutil.copytree(base / part, tmp / part)
            for extra in ("model_index.json", SMOKE_MARKER):
                if (base / extra).is_file():
                    shutil.copy2(base / extra, tmp / extra)
            atomic_write_json(tmp / MERGE_INFO, provenance or {})
    except OSError as exc:
        raise InvalidInputError(f"--out {out}", f"could not write the merged model ({exc})") from None
    return out
