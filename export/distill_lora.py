"""The distillation LoRA a repository may serve as its few-step UNet (``export repository --distill-lora FILE``).

A distillation LoRA (LCM-LoRA, TCD-LoRA, Hyper-SD's LoRAs for SD-1.5) turns
the base UNet into a few-step model. It is the same for every user, so it is
not a runtime input: it is **merged** into a copy of the base UNet
(``W + w * alpha / r * B @ A``, :func:`facetron.export.merge.fuse_into`), and
that UNet is exported as ``unet_fewstep``, a second runtime-LoRA UNet with the
``unet``'s contract: users' face and style LoRAs stack on top of it at run
time, as diffusers' ``set_adapters(["distill", "face"], [w_distill, w_face])``
adds both to the base weights. Requests with a few-step scheduler run on it;
the ordinary path keeps the plain ``unet``.

:func:`load_distill_lora` reads any format :func:`facetron.export.lora_files.load_lora`
reads (diffusers / peft, kohya ``lora_unet_*`` + ``.alpha``: LCM-LoRA's
published file) and checks it against the base UNet before any export: every
layer must be one of the base UNet's Linear / Conv2d layers with the same
shape (a real LCM-LoRA adapts attention q/k/v/out, proj_in/out, the
feed-forwards, the resnets' conv1/conv2/conv_shortcut/time_emb_proj and the
down/up samplers' convs); text-encoder layers are refused (the served
``text_encoder`` is shared by every scheduler). Errors name ``--distill-lora``
or ``--distill-weight``.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch

from facetron.contract import DEFAULT_DISTILL_WEIGHT, UNET_FEWSTEP
from facetron.diffusion.lora_reader import check_weight, few
from facetron.errors import InvalidInputError
from facetron.export.lora_files import LoraFile, check_lora_matches, load_lora
from facetron.export.merge import fuse_into

FLAG = "--distill-lora"
#: the UNet layers a real LCM-LoRA (SD-1.5, rank 64) adapts: diffusers' examples/consistency_distillation/
#: train_lcm_distill_lora_sd_wds.py's LoRA target modules (TCD-LoRA and Hyper-SD's SD-1.5 LoRAs cover the same
#: kinds of layers); every one is a Linear or Conv2d layer of the base UNet, merged like any other
LCM_LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                           "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv",
                           "time_emb_proj")
WEIGHT_FLAG = "--distill-weight"
#: a distillation LoRA's weight: (0, MAX_DISTILL_WEIGHT] (diffusers' docs use 1; above 2 it overwhelms the base)
MAX_DISTILL_WEIGHT = 2.0


def check_distill_weight(weight: float) -> float:
    """``weight`` as a float in (0, MAX_DISTILL_WEIGHT], else InvalidInputError naming ``--distill-weight``."""
    weight = check_weight(WEIGHT_FLAG, weight)
    if not 0.0 < weight <= MAX_DISTILL_WEIGHT:
        raise InvalidInputError(WEIGHT_FLAG, f"must be in (0, {MAX_DISTILL_WEIGHT:g}], got {weight:g}")
    return weight


def load_distill_lora(path: str | Path, base) -> LoraFile:
    """The LoRA file ``path`` checked against ``base`` (a :class:`facetron.diffusion.base_model.BaseModel`):
    UNet layers only, each one of the base UNet's Linear / Conv2d layers with its shape; module paths
    aligned to the base UNet. InvalidInputError naming ``--distill-lora``."""
    # 1. read (diffusers, peft or kohya keys); a file that is no LoRA is named with the flag
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(FLAG, f"{path} is not a file (a LoRA .safetensors: LCM-LoRA, TCD-LoRA, Hyper-SD)")
    try:
        lora = load_lora(path)
    except InvalidInputError as exc:
        raise InvalidInputError(FLAG, f"{path}: {exc.rule}") from None
    # 2. UNet layers only: the served text_encoder serves every scheduler
    te = lora.component("text_encoder")
    if te:
        raise InvalidInputError(FLAG, f"{path} adapts {len(te)} text-encoder layers (e.g. {few(te, 1)}); a "
                                      "distillation LoRA is merged into the few-step UNet only, and the served "
                                      "text_encoder is shared by every scheduler: give a UNet-only LoRA")
    if not lora.component("unet"):
        raise InvalidInputError(FLAG, f"{path} adapts no UNet layer")
    # 3. every layer one of the base UNet's, with its shape (a LoRA for SDXL or another model is refused here)
    try:
        return check_lora_matches(lora, {"unet": base.unet})
    except InvalidInputError as exc:
        raise InvalidInputError(FLAG, f"{path}: {exc.rule}") from None


def fewstep_unet(base, distill: LoraFile, weight: float = DEFAULT_DISTILL_WEIGHT) -> torch.nn.Module:
    """A copy of ``base``'s UNet with ``distill`` merged in at ``weight`` (float32, every layer
    ``W + weight * alpha / r * B @ A``); the base UNet is left as it was."""
    unet = copy.deepcopy(base.unet)
    fuse_into({"unet": unet}, [(distill, check_distill_weight(weight))])
    return unet.eval()


def layer_kind(module: str) -> str:
    """A UNet module path without its block indices: ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``
    -> ``attn1.to_q``, ``up_blocks.0.upsamplers.0.conv`` -> ``upsamplers.conv``, ``mid_block.resnets.0.conv1`` -> ``conv1``."""
    kind = re.sub(r"(?:(?:down|up)_blocks|attentions|resnets|transformer_blocks)\.\d+\.|mid_block\.", "", module)
    return re.sub(r"(downsamplers|upsamplers)\.\d+\.", r"\1.", kind)


def distill_info(distill: LoraFile, weight: float) -> dict:
    """What the generator records of the distillation LoRA it serves (``model_info.json``'s ``distill_lora``)."""
    kinds = sorted({layer_kind(module) for module in distill.component("unet")})
    return {
        "path": str(Path(distill.source).resolve()),
        "format": distill.format,
        "sha256": distill.sha256,
        "hash": (distill.sha256 or "")[:16],
        "weight": float(weight),
        "layers": len(distill.component("unet")),
        "layer_kinds": kinds,
        "ranks": sorted({layer.rank for layer in distill.layers.values()}),
        "model": UNET_FEWSTEP.name,
    }
