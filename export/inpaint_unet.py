"""The inpainting UNet a repository may serve for template mode (``export repository --inpaint-unet DIR``).

diffusers' ``UNet2DConditionModel`` from a folder the user supplies (e.g. the
``unet/`` folder of an SD-1.5 inpainting model): no weights ship with
facetron. Its input is the scaled latents, the mask and the masked template's
latent side by side (``2 * latent_channels + 1`` channels, 9 for SD-1.5:
diffusers' ``StableDiffusionInpaintPipeline`` order, which
:func:`facetron.diffusion.sampler.denoise` feeds). :func:`load_inpaint_unet`
checks it against the base model's UNet before any export: those input
channels, the base's latent output channels, the same blocks, and the same
runtime-LoRA layers (every attention q/k/v/out projection under the same
module path with the same shapes: a user's identity LoRA, trained on the base
UNet, applies to it as diffusers' ``load_lora_weights`` applies it to an
inpainting pipeline; ``conv_in``, the one layer that differs, has no LoRA).

:func:`export_inpaint_unet` writes it as the runtime-LoRA graph
(:class:`facetron.export.runtime_lora.RuntimeLoraUNet`: the LoRA tensors as
graph inputs, the served ``unet``'s ``lora_manifest.json``) into
``<out>/unet_inpaint/``, served as ``unet_inpaint`` by the ``unet``'s code. No
step-cache graphs and no ControlNet graph are made for it: template mode on it
refuses ``cache_interval`` > 1 and ``control`` (:mod:`facetron.pipeline.job`).

:func:`write_random_inpaint_unet`: a small random one matching the tiny
default UNet, for tests and the demo."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from facetron import contract
from facetron.diffusion.lora_inputs import MANIFEST_FILE
from facetron.errors import InvalidInputError
from facetron.export.diffusers_folder import load_component, weights_hash
from facetron.export.onnx_graph import DEFAULT_OPSET, EXTERNAL_DATA_THRESHOLD, ModelDims, example_inputs, export_graph
from facetron.export.runtime_lora import RuntimeLoraUNet, adapted, build_manifest, runtime_lora_io

UNET_CLASS = "UNet2DConditionModel"
FLAG = "--inpaint-unet"
#: the UNet config keys an inpainting UNet must share with the base model's (all but its input channels)
SHARED_CONFIG = ("down_block_types", "up_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
                 "attention_head_dim", "norm_num_groups", "out_channels")


def _same(a, b) -> bool:
    return (list(a) if isinstance(a, (list, tuple)) else a) == (list(b) if isinstance(b, (list, tuple)) else b)


def _lora_layers(manifest: dict) -> list[tuple[str, int, int]]:
    return [(layer["module"], layer["in_features"], layer["out_features"]) for layer in manifest["layers"]]


def load_inpaint_unet(path: str | Path, base):
    """The ``UNet2DConditionModel`` in folder ``path`` (diffusers layout, safetensors weights), checked against
    ``base`` (a :class:`facetron.diffusion.base_model.BaseModel`); InvalidInputError naming ``--inpaint-unet``."""
    from diffusers import UNet2DConditionModel

    net = load_component(path, UNet2DConditionModel, FLAG, "e.g. the unet folder of an SD-1.5 inpainting model")
    # 3. the inpainting layout: latents + mask + masked-image latents in, the base's latents out
    cfg, unet = net.config, base.unet.config
    latent = int(base.vae.config.latent_channels)
    if int(cfg.in_channels) != 2 * latent + 1:
        raise InvalidInputError(FLAG, f"{path}: takes {cfg.in_channels} input channels; an inpainting UNet for this "
                                      f"base model takes {2 * latent + 1} (latents {latent} + mask 1 + masked-image "
                                      f"latents {latent}): a plain text-to-image UNet is not an inpainting UNet")
    # 4. the base model's UNet otherwise: the same blocks and the same runtime-LoRA layers (a user's LoRA applies)
    for key in SHARED_CONFIG:
        mine, theirs = getattr(cfg, key), getattr(unet, key)
        if not _same(mine, theirs):
            raise InvalidInputError(FLAG, f"{path}: its {key} is {mine}, the base model's UNet's {theirs}: an "
                                          "inpainting UNet of another model family")
    mine, theirs = _lora_layers(build_manifest(net, 1)), _lora_layers(build_manifest(base.unet, 1))
    if mine != theirs:
        diff = next((a, b) for a, b in zip(mine + [None] * len(theirs), theirs + [None] * len(mine)) if a != b)
        raise InvalidInputError(FLAG, f"{path}: its attention layers differ from the base model's UNet's (first: "
                                      f"{diff[0]} vs {diff[1]}): users' LoRAs would not apply")
    return net.eval().requires_grad_(False)


def inpaint_unet_info(path: str | Path, net) -> dict:
    """What the generator records of the inpainting UNet it serves (``model_info.json``'s
    :data:`~facetron.contract.INPAINT_INFO`): template-mode requests denoise on ``unet_inpaint`` where it is set."""
    path = Path(path)
    return {"class": UNET_CLASS, "model": contract.UNET_INPAINT.name, "path": str(path.resolve()),
            "hash": weights_hash(path), "in_channels": int(net.config.in_channels)}


def export_inpaint_unet(net: torch.nn.Module, out_dir: str | os.PathLike, *, dims: ModelDims, rank: int,
                        opset: int = DEFAULT_OPSET, batch: int = 2,
                        external_threshold: int = EXTERNAL_DATA_THRESHOLD) -> Path:
    """Write ``<out_dir>/unet_inpaint/{model.onnx, io.json, lora_manifest.json}``: the runtime-LoRA graph of
    ``net`` (``sample FP32[N, in_channels, h, w]``, ``timestep FP32[N]``, ``encoder_hidden_states``, then the
    LoRA inputs of rank ``rank`` -> ``noise_pred``), as the served ``unet``'s plain graph."""
    dims = dataclasses.replace(dims, unet_in_channels=int(net.config.in_channels))
    manifest = build_manifest(net, rank)
    inputs, outputs = runtime_lora_io(dims, manifest)
    example = example_inputs(inputs, dims, batch=batch, rank=rank)
    info = {"model": contract.UNET_INPAINT.name, "fp16_weights": False, "lora_rank": rank,
            "notes": "runtime LoRA (lora_manifest.json) over an inpainting UNet: sample = latents, mask, masked-image "
                     "latents (StableDiffusionInpaintPipeline's order); timestep FP32 [N]"}
    with adapted(RuntimeLoraUNet, net) as module:
        return export_graph(module, inputs, outputs, example, Path(out_dir) / contract.UNET_INPAINT.name, opset=opset,
                            info=info, external_threshold=external_threshold, extra_files={MANIFEST_FILE: manifest})


def write_random_inpaint_unet(folder: str | Path, unet_config: dict | None = None, seed: int = 0,
                              in_channels: int = contract.INPAINT_UNET_CHANNELS) -> Path:
    """A small ``UNet2DConditionModel`` with seeded random weights saved (safetensors) to ``folder``: the tiny
    default model's UNet config (or ``unet_config``) with ``in_channels`` input channels (9: an inpainting UNet;
    4 gives a plain one, which ``--inpaint-unet`` refuses)."""
    from diffusers import UNet2DConditionModel

    from facetron.diffusion.model_spec import TINY

    config = {**(TINY.unet if unet_config is None else unet_config), "in_channels": in_channels}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = UNet2DConditionModel(**config)
    net.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)
