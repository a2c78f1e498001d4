"""Synthetic LoRA files for tests and benchmarks (many users without training).

:func:`write_random_lora` injects a peft LoRA into a copy of a UNet (and
optionally of a text encoder), draws both matrices from a seed and saves the
result through the trainer's own writer, so in format the file is a trained
one (facetron's canonical layout, see :mod:`facetron.diffusion.lora_inputs`).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Iterable

import torch
from peft import LoraConfig, inject_adapter_in_model

from facetron.training.train_lora import write_lora_file

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def write_random_lora(path: str | Path, unet: torch.nn.Module, *, rank: int = 4, alpha: float = 32.0, seed: int = 0,
                      std: float = 0.01, target_modules: Iterable[str] = UNET_TARGETS,
                      text_encoder: torch.nn.Module | None = None, te_rank: int = 4, te_alpha: float = 8.0,
                      te_target_modules: Iterable[str] = TEXT_ENCODER_TARGETS) -> Path:
    """Write a LoRA file with seeded random A **and B**, through the trainer's own writer.

    peft's ``gaussian`` init leaves B at zero (the LoRA would do nothing), so
    both matrices are redrawn from ``seed``: A ~ N(0, 1/r), B ~ N(0, std²).
    The modules are copied, never modified."""
    gen = torch.Generator().manual_seed(seed)
    unet = copy.deepcopy(unet)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(target_modules)))
    te, te_config = None, None
    if text_encoder is not None:
        te_config = LoraConfig(r=te_rank, lora_alpha=te_alpha, init_lora_weights="gaussian",
                               target_modules=list(te_target_modules))
        te = inject_adapter_in_model(te_config, copy.deepcopy(text_encoder))
    with torch.no_grad():
        for module, r in ((unet, rank), (te, te_rank)):
            for name, p in (module.named_parameters() if module is not None else ()):
                if "lora_A" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(r))
                elif "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
    return write_lora_file(Path(path), unet, text_encoder=te, text_encoder_config=te_config)
