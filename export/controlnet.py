"""The ControlNet a repository may serve for template mode (``export repository --controlnet DIR``).

diffusers' ``ControlNetModel`` from a folder the user supplies (e.g. a copy of
an SD-1.5 canny ControlNet): no weights ship with facetron.
:func:`load_controlnet` checks it against the base model's UNet before any
export — the same down blocks (so its residuals fit the UNet's), latent
channels, text hidden size, an RGB conditioning image at the VAE's pixels
per latent cell, safetensors weights.

Two graphs are exported (:func:`export_controlnet_graphs`):

* ``<out>/controlnet/``: the served ``controlnet``: ``sample FP32[N,4,h,w]``,
  ``timestep FP32[N]``, ``encoder_hidden_states FP32[N,77,C]``,
  ``controlnet_cond FP32[N,3,H,W]`` (the conditioning image in [0, 1], as
  diffusers' ``control_image_processor`` prepares it), ``conditioning_scale
  FP32[N]`` -> ``down_block_residual_<i>`` (one per down-block residual of
  the UNet: 12 for SD-1.5, 4 for the tiny default) and
  ``mid_block_residual``, each x its item's scale (``ControlNetModel.forward``
  multiplies by ``conditioning_scale``; ``guess_mode=False``);
* ``<out>/unet/control/``: the runtime-LoRA UNet (the served ``unet``'s LoRA
  inputs and manifest) that also takes those residuals and adds them, as
  ``UNet2DConditionModel.forward(down_block_additional_residuals=...,
  mid_block_additional_residual=...)`` does. The ``unet`` model opens it on
  the first request that sends residuals; its plain graph is unchanged.

Each folder holds :data:`facetron.contract.CONTROL_LAYOUT`: every residual's
name, channels and pixels-per-cell factor (the served models check shapes
with it) and the conditioning image's factor.

:func:`write_random_controlnet`: a small random ``ControlNetModel`` matching
the tiny default UNet, for tests and the demo (no weights ship)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from facetron import contract
from facetron.contract import CONTROL_DOWN_RESIDUALS, CONTROL_FOLDER, CONTROL_LAYOUT, CONTROL_MID_RESIDUAL
from facetron.diffusion.lora_inputs import MANIFEST_FILE
from facetron.errors import InvalidInputError
from facetron.export.diffusers_folder import load_component, weights_hash
from facetron.export.model_configs import NET_QUEUE, ModelDef, Serving
from facetron.export.onnx_graph import (DEFAULT_OPSET, EXTERNAL_DATA_THRESHOLD, ModelDims, TensorSpec, example_inputs,
                                        export_graph, model_io)
from facetron.export.runtime_lora import RuntimeLoraUNet, adapted, build_manifest, lora_specs

CONTROLNET_CLASS = "ControlNetModel"
FLAG = "--controlnet"
#: the served ``controlnet``: a python model over ONNX Runtime / OpenVINO on cpu (the unet's runtime choice), ONNX
#: Runtime's CUDA provider on gpu (like the runtime-LoRA unet it feeds); it waits for other callers' steps as the unet
CONTROLNET_MODEL = ModelDef(contract.CONTROLNET, queue_delay_us=3000, queue=NET_QUEUE,
                            cpu=Serving(artifact=contract.MODEL_FILE),
                            gpu=Serving(kind="KIND_GPU", artifact=contract.MODEL_FILE,
                                        parameters={"intra_op_threads": "0", "providers": "cuda"}))
#: the UNet config keys a ControlNet must share with it (its residuals are added block by block)
SHARED_CONFIG = ("down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
                 "attention_head_dim", "norm_num_groups")


# ----------------------------------------------------------------------------- the residuals


def residual_layout(unet: torch.nn.Module) -> list[tuple[int, int]]:
    """(channels, latent cells per residual cell along a side: 1, 2, 4, 8) of each residual a diffusers
    ``UNet2DConditionModel`` (or ``ControlNetModel``) produces in its down path, in order: ``conv_in``'s output,
    then per down block one per resnet and one per downsampler; the mid block's last."""
    channels = [int(c) for c in unet.config.block_out_channels]
    layout, factor = [(channels[0], 1)], 1
    for i, block in enumerate(unet.down_blocks):
        layout += [(channels[i], factor)] * len(block.resnets)
        if getattr(block, "downsamplers", None) is not None:
            factor *= 2
            layout.append((channels[i], factor))
    return layout + [(channels[-1], factor)]


def layout_record(layout: Sequence[tuple[int, int]], cond_factor: int) -> dict:
    """:data:`~facetron.contract.CONTROL_LAYOUT`'s content: each residual's name, channels and factor."""
    names = CONTROL_DOWN_RESIDUALS[: len(layout) - 1] + (CONTROL_MID_RESIDUAL,)
    return {"residuals": [{"name": n, "channels": c, "factor": f} for n, (c, f) in zip(names, layout)],
            "cond_factor": cond_factor}


def residual_specs(layout: Sequence[tuple[int, int]]) -> list[TensorSpec]:
    """The residual tensors [N, C, h/f, w/f] (symbols ``h``, ``w`` at f = 1, ``h_<f>``, ``w_<f>`` below)."""
    out = []
    for spec in layout_record(layout, 1)["residuals"]:
        f = spec["factor"]
        h, w = ("h", "w") if f == 1 else (f"h_{f}", f"w_{f}")
        out.append(TensorSpec(spec["name"], "FP32", ("N", spec["channels"], h, w)))
    return out


def residual_examples(layout: Sequence[tuple[int, int]], batch: int, latent: int, seed: int = 0
                      ) -> dict[str, np.ndarray]:
    """Seeded residuals of a ``latent`` x ``latent`` sample (sides ceil(latent / f), as a stride-2 conv gives)."""
    rng = np.random.default_rng(seed)
    return {s.name: (0.1 * rng.standard_normal((batch, s.dims[1], -(-latent // f), -(-latent // f)))).astype(np.float32)
            for s, (_, f) in zip(residual_specs(layout), layout)}


# ----------------------------------------------------------------------------- the weights: checked


def conditioning_factor(config) -> int:
    """Pixels of the conditioning image per latent cell: the conditioning embedding halves the side in every
    block but the first."""
    return 2 ** (len(config.conditioning_embedding_out_channels) - 1)


def load_controlnet(path: str | Path, base):
    """The ``ControlNetModel`` in folder ``path`` (diffusers layout, safetensors weights), checked against
    ``base`` (a :class:`facetron.diffusion.base_model.BaseModel`); InvalidInputError naming ``--controlnet``."""
    from diffusers import ControlNetModel

    net = load_component(path, ControlNetModel, FLAG, "e.g. a copy of an SD-1.5 canny ControlNet")
    # 3. the base model's UNet: the same blocks (residual for residual), latents and text; an RGB image
    cfg, unet = net.config, base.unet.config
    for key in SHARED_CONFIG:
        mine, theirs = getattr(cfg, key), getattr(unet, key)
        if (list(mine) if isinstance(mine, (list, tuple)) else mine) != \
                (list(theirs) if isinstance(theirs, (list, tuple)) else theirs):
            raise InvalidInputError(FLAG, f"{path}: its {key} is {mine}, the base model's UNet's {theirs}: a "
                                          "ControlNet for another model family")
    if int(cfg.in_channels) != int(base.vae.config.latent_channels):
        raise InvalidInputError(FLAG, f"{path}: takes {cfg.in_channels} latent channels, the base model's VAE "
                                      f"gives {base.vae.config.latent_channels}")
    if int(cfg.conditioning_channels) != 3:
        raise InvalidInputError(FLAG, f"{path}: its conditioning image has {cfg.conditioning_channels} channels; "
                                      "facetron's control images are RGB (3)")
    if conditioning_factor(cfg) != base.latent_factor:
        raise InvalidInputError(FLAG, f"{path}: its conditioning embedding scales a latent cell to "
                                      f"{conditioning_factor(cfg)} px, the base model's VAE to {base.latent_factor} px")
    if cfg.global_pool_conditions or cfg.controlnet_conditioning_channel_order != "rgb":
        raise InvalidInputError(FLAG, f"{path}: global_pool_conditions (guess mode) and a bgr channel order are not "
                                      "served")
    layout = residual_layout(net)
    if layout != residual_layout(base.unet) or len(layout) - 1 > contract.MAX_CONTROL_RESIDUALS:
        raise InvalidInputError(FLAG, f"{path}: gives {len(layout) - 1} down residuals; the base model's UNet takes "
                                      f"{len(residual_layout(base.unet)) - 1} (served: at most "
                                      f"{contract.MAX_CONTROL_RESIDUALS})")
    return net.eval().requires_grad_(False)


def controlnet_info(path: str | Path, net) -> dict:
    """What the generator records of the ControlNet it serves (``model_info.json``'s ``controlnet``): the
    residual names the ``controlnet`` model gives and the ``unet`` takes."""
    path = Path(path)
    record = layout_record(residual_layout(net), conditioning_factor(net.config))
    return {"class": CONTROLNET_CLASS, "path": str(path.resolve()), "hash": weights_hash(path),
            "residuals": [r["name"] for r in record["residuals"]], "controls": list(contract.CONTROL_CHOICES[1:])}


# ----------------------------------------------------------------------------- the graphs


class ControlNetGraph(torch.nn.Module):
    """The served ``controlnet``: diffusers' ``ControlNetModel.forward`` (``guess_mode=False``) with a
    per-item ``conditioning_scale`` [N] multiplied into every residual (its forward multiplies by a float)."""

    def __init__(self, controlnet: torch.nn.Module):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale):
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
                                    guess_mode=False, return_dict=False)
        scale = conditioning_scale.reshape(-1, 1, 1, 1)
        return tuple(d * scale for d in down) + (mid * scale,)


class ControlUNetGraph(torch.nn.Module):
    """The ``unet``'s control graph: the runtime-LoRA UNet (:class:`RuntimeLoraUNet`) given the ControlNet's
    ``count`` down residuals and its mid residual after its own inputs, then the LoRA inputs."""

    def __init__(self, runtime_lora_unet: RuntimeLoraUNet, count: int):
        super().__init__()
        self.inner = runtime_lora_unet
        self.count = count

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        down, mid, lora = rest[: self.count], rest[self.count], rest[self.count + 1:]
        dt = self.inner.compute_dtype
        with self.inner.bound(lora) as unet:
            out = unet(sample.to(dt), timestep, encoder_hidden_states.to(dt),
                       down_block_additional_residuals=tuple(d.to(dt) for d in down),
                       mid_block_additional_residual=mid.to(dt), return_dict=False)[0]
        return out.float()


def controlnet_io(dims: ModelDims, layout: Sequence[tuple[int, int]]) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of the served ``controlnet`` graph."""
    unet_inputs, _ = model_io("unet", dims)
    inputs = [*unet_inputs, TensorSpec("controlnet_cond", "FP32", ("N", 3, "H", "W")),
              TensorSpec("conditioning_scale", "FP32", ("N",))]
    return inputs, residual_specs(layout)


def export_controlnet_graphs(controlnet: torch.nn.Module, unet: torch.nn.Module, out_dir: str | os.PathLike, *,
                             dims: ModelDims, rank: int, opset: int = DEFAULT_OPSET, batch: int = 2,
                             external_threshold: int = EXTERNAL_DATA_THRESHOLD) -> tuple[Path, Path]:
    """Write ``<out_dir>/controlnet/`` (the served ControlNet) and ``<out_dir>/unet/control/`` (the
    runtime-LoRA UNet taking its residuals, LoRA rank ``rank``), each with :data:`CONTROL_LAYOUT`."""
    out_dir = Path(out_dir)
    layout = residual_layout(unet)
    record = layout_record(layout, conditioning_factor(controlnet.config))
    count = len(layout) - 1
    # 1. the ControlNet
    inputs, outputs = controlnet_io(dims, layout)
    example = example_inputs(inputs, dims, batch=batch)
    example["controlnet_cond"] = np.random.default_rng(1).random(example["controlnet_cond"].shape, np.float32)
    example["conditioning_scale"] = np.linspace(0.5, 1.0, batch, dtype=np.float32)
    info = {"model": contract.CONTROLNET.name, "fp16_weights": False,
            "notes": "diffusers ControlNetModel (guess_mode=False); every residual x conditioning_scale [N]; "
                     "controlnet_cond in [0, 1] at the image size; timestep FP32 [N]"}
    cn_path = export_graph(ControlNetGraph(controlnet).eval(), inputs, outputs, example,
                           out_dir / contract.CONTROLNET.name, opset=opset, info=info,
                           external_threshold=external_threshold, extra_files={CONTROL_LAYOUT: record})
    # 2. the runtime-LoRA UNet with the residual inputs (the served unet's LoRA inputs, in the same order)
    manifest = build_manifest(unet, rank)
    unet_inputs, unet_outputs = model_io("unet", dims)
    residuals = residual_specs(layout)
    inputs = [*unet_inputs, *residuals, *lora_specs(manifest)]
    example = example_inputs([*unet_inputs, *lora_specs(manifest)], dims, batch=batch, rank=rank)
    example.update(residual_examples(layout, batch, dims.latent_size))
    info = {"model": f"{contract.UNET.name}/{CONTROL_FOLDER}", "fp16_weights": False, "lora_rank": rank,
            "notes": "runtime LoRA (lora_manifest.json) + the ControlNet's residuals added as "
                     "down_block_additional_residuals / mid_block_additional_residual; timestep FP32 [N]"}
    with adapted(RuntimeLoraUNet, unet) as module:
        unet_path = export_graph(ControlUNetGraph(module, count).eval(), inputs, unet_outputs, example,
                                 out_dir / contract.UNET.name / CONTROL_FOLDER, opset=opset, info=info,
                                 external_threshold=external_threshold,
                                 extra_files={MANIFEST_FILE: manifest, CONTROL_LAYOUT: record})
    return cn_path, unet_path


# ----------------------------------------------------------------------------- a random one, for tests


def write_random_controlnet(folder: str | Path, unet_config: dict | None = None, seed: int = 0,
                            conditioning_channels: tuple[int, ...] = (8, 16, 32, 32), zero_conv_std: float = 0.3,
                            **config) -> Path:
    """A small ``ControlNetModel`` with seeded random weights saved (safetensors) to ``folder``: the blocks of
    ``unet_config`` (default: the tiny default model's UNet), a conditioning embedding of
    ``conditioning_channels`` (8 px per latent cell with 4 entries, as SD's VAE); ``config``: other
    ``ControlNetModel`` arguments. A ControlNet's zero convolutions start at zero (it changes nothing until
    trained): here they are N(0, ``zero_conv_std``²) / fan-in so its residuals move the tiny UNet's pictures."""
    from diffusers import ControlNetModel

    from facetron.diffusion.model_spec import TINY

    unet = dict(TINY.unet if unet_config is None else unet_config)
    shape = {k: unet[k] for k in ("in_channels", *SHARED_CONFIG) if k in unet}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        net = ControlNetModel(**shape, conditioning_embedding_out_channels=conditioning_channels, **config)
        zero = [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]
        for conv in zero:
            fan_in = conv.weight[0].numel()
            conv.weight.normal_(0.0, zero_conv_std / fan_in ** 0.5)
            conv.bias.normal_(0.0, 0.1 * zero_conv_std)
    net.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)
