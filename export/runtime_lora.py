"""Runtime-LoRA UNet: one ONNX graph for every user, the LoRA given as inputs.

Each attention projection (``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of
every ``attn1``/``attn2``) computes

    y = W x + lora_scale[n] * B_i[n] @ (A_i[n] @ x)

with ``A_i`` (``lora_a_<i>  FP32[N, R, in]``) and ``B_i`` (``lora_b_<i>
FP32[N, out, R]``) graph inputs that carry the batch dimension, so Triton's
dynamic batcher can put requests of *different users* into one batch, and
``lora_scale FP32[N]`` (1 = the user's LoRA as built, 0 = the base model).
The rank ``R`` is fixed at export time; smaller LoRAs are zero-padded, which
is exact (zero rows/columns add nothing). A face LoRA and a style LoRA are
concatenated along the rank axis, their ``w · alpha / r`` folded into ``B``
— also exact. ``lora_manifest.json`` maps ``i`` to the module name and shapes.
Input names are lower_snake_case, as the repository contract wants.

The served text encoder is the same idea (:func:`export_runtime_lora_text_encoder`,
``text_encoder_lora/``): every CLIP self-attention q/k/v/out projection (what
the trainer adapts) takes per-item A/B inputs and ``lora_scale``; its manifest
says ``"component": "text_encoder"``, and each graph takes only its own
component's layers of a user's LoRA.

This module holds the torch side only (the graphs and their export). The names,
the manifest reader and the inputs for a user's LoRA files are numpy code in
:mod:`facetron.diffusion.lora_inputs`, which the server imports.
"""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch

from facetron.diffusion.lora_inputs import MANIFEST_FILE, SCALE_INPUT, a_name, b_name
from facetron.errors import InvalidInputError
from facetron.export.onnx_graph import (DEFAULT_OPSET, EXTERNAL_DATA_THRESHOLD, ModelDims, TensorSpec, example_inputs,
                                        export_graph, model_io)
from facetron.training.lora_config import TEXT_ENCODER_TARGET_MODULES

MODEL_NAME = "unet_lora"
TARGET_SUFFIXES = ("to_q", "to_k", "to_v", "to_out.0")


def runtime_lora_targets(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """The adapted layers, in network order: attention q/k/v/out projections."""
    out = []
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name.endswith("." + s) for s in TARGET_SUFFIXES) \
                and (".attn1." in name or ".attn2." in name):
            out.append((name, module))
    return out


class _RuntimeLoraLinear(torch.nn.Module):
    """``base(x) + scale · (x Aᵀ) Bᵀ`` with per-sample A, B, scale set before each call."""

    def __init__(self, base: torch.nn.Linear):
        super().__init__()
        self.base = base
        self.lora: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.lora is None:
            raise RuntimeError("runtime LoRA tensors were not set")
        a, b, scale = self.lora
        t = torch.matmul(x, a.to(x.dtype).transpose(1, 2))  # [N,T,in] @ [N,in,R] -> [N,T,R]
        t = torch.matmul(t, b.to(x.dtype).transpose(1, 2))  # [N,T,R] @ [N,R,out] -> [N,T,out]
        return y + t * scale.to(x.dtype).reshape(-1, *([1] * (t.dim() - 1)))


class RuntimeLoraUNet(torch.nn.Module):
    """The torch function the ``unet_lora`` graph computes (a copy of ``unet`` is adapted)."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = copy.deepcopy(unet).eval()
        self.compute_dtype = next(self.unet.parameters()).dtype
        self.modules_ = [name for name, _ in runtime_lora_targets(self.unet)]
        layers = []
        for name in self.modules_:
            wrapper = _RuntimeLoraLinear(self.unet.get_submodule(name))
            self.unet.set_submodule(name, wrapper)
            layers.append(wrapper)
        object.__setattr__(self, "_layers", layers)  # plain list: already registered inside self.unet

    @contextlib.contextmanager
    def bound(self, lora_scale: torch.Tensor, lora: Sequence[torch.Tensor]) -> Iterator[torch.nn.Module]:
        """``self.unet`` with the graph's LoRA inputs set on its adapted layers for
        the ``with`` block (any forward of it, whole or in parts, uses them)."""
        if len(lora) != 2 * len(self._layers):
            raise ValueError(f"expected {2 * len(self._layers)} LoRA tensors, got {len(lora)}")
        for i, layer in enumerate(self._layers):
            layer.lora = (lora[2 * i], lora[2 * i + 1], lora_scale)
        try:
            yield self.unet
        finally:
            for layer in self._layers:
                layer.lora = None

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                lora_scale: torch.Tensor, *lora: torch.Tensor) -> torch.Tensor:
        dt = self.compute_dtype
        with self.bound(lora_scale, lora) as unet:
            out = unet(sample.to(dt), timestep, encoder_hidden_states.to(dt), return_dict=False)[0]
        return out.float()


def build_manifest(unet: torch.nn.Module, rank: int, component: str = "unet") -> dict:
    """Index -> module name and shapes of every runtime-LoRA input pair of
    ``component`` ("unet": the UNet's attention projections; "text_encoder":
    the CLIP text encoder's, :func:`text_encoder_lora_targets`)."""
    if component == "text_encoder":
        return _manifest(text_encoder_lora_targets(unet), rank, component)
    layers = []
    for i, (name, lin) in enumerate(runtime_lora_targets(unet)):
        layers.append({"index": i, "module": name, "in_features": lin.in_features, "out_features": lin.out_features,
                       "a": a_name(i), "a_dims": ["N", rank, lin.in_features],
                       "b": b_name(i), "b_dims": ["N", lin.out_features, rank]})
    if not layers:
        raise InvalidInputError("unet", "has no attention to_q/to_k/to_v/to_out.0 layers to adapt")
    return {"component": component, "rank": rank, "scale_input": SCALE_INPUT, "layers": layers,
            "formula": "y = W x + lora_scale[n] * B_i[n] @ (A_i[n] @ x); A_i [N,R,in], B_i [N,out,R]",
            "padding": "ranks below R are zero-padded; face and style LoRAs are concatenated along R"}


def runtime_lora_io(dims: ModelDims, manifest: Mapping) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of the graph: the UNet's, then ``lora_scale`` and each layer's A, B."""
    inputs, outputs = model_io("unet", dims)
    inputs = [*inputs, TensorSpec(SCALE_INPUT, "FP32", ("N",))]
    for layer in manifest["layers"]:
        inputs.append(TensorSpec(layer["a"], "FP32", tuple(layer["a_dims"])))
        inputs.append(TensorSpec(layer["b"], "FP32", tuple(layer["b_dims"])))
    return inputs, outputs


def export_runtime_lora_unet(unet: torch.nn.Module, out_dir: str | os.PathLike, *, dims: ModelDims, rank: int = 16,
                             fp16: bool = False, opset: int = DEFAULT_OPSET, batch: int = 2,
                             external_threshold: int = EXTERNAL_DATA_THRESHOLD) -> Path:
    """Write ``<out_dir>/unet_lora/{model.onnx, io.json, lora_manifest.json}``."""
    if not isinstance(rank, int) or rank < 1:
        raise InvalidInputError("--runtime-lora-rank", f"must be an integer >= 1, got {rank!r}")
    manifest = build_manifest(unet, rank)
    module = RuntimeLoraUNet(copy.deepcopy(unet).half() if fp16 else unet)
    inputs, outputs = runtime_lora_io(dims, manifest)
    example = example_inputs(inputs, dims, batch=batch)
    info = {"model": MODEL_NAME, "fp16_weights": fp16, "lora_rank": rank,
            "notes": "runtime LoRA: see lora_manifest.json; timestep FP32 [N]"}
    return export_graph(module, inputs, outputs, example, Path(out_dir) / MODEL_NAME, opset=opset, info=info,
                        external_threshold=external_threshold, extra_files={MANIFEST_FILE: manifest})


# ----------------------------------------------------------------------------- the text encoder's

TEXT_ENCODER_MODEL_NAME = "text_encoder_lora"
#: the CLIP self-attention projections, what the trainer adapts (fc1/fc2 are not: a LoRA adapting them is refused)
TEXT_ENCODER_TARGET_SUFFIXES = TEXT_ENCODER_TARGET_MODULES


def text_encoder_lora_targets(text_encoder: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """The text encoder's adapted layers, in network order: self-attention q/k/v/out projections
    (module names as peft names them in a LoRA file's ``text_encoder.`` keys)."""
    return [(name, m) for name, m in text_encoder.named_modules()
            if isinstance(m, torch.nn.Linear) and ".self_attn." in name
            and name.rsplit(".", 1)[-1] in TEXT_ENCODER_TARGET_SUFFIXES]


def _manifest(targets: list[tuple[str, torch.nn.Linear]], rank: int, component: str) -> dict:
    layers = [{"index": i, "module": name, "in_features": lin.in_features, "out_features": lin.out_features,
               "a": a_name(i), "a_dims": ["N", rank, lin.in_features],
               "b": b_name(i), "b_dims": ["N", lin.out_features, rank]} for i, (name, lin) in enumerate(targets)]
    if not layers:
        raise InvalidInputError(component, "has no attention q/k/v/out projections to adapt")
    return {"component": component, "rank": rank, "scale_input": SCALE_INPUT, "layers": layers,
            "formula": "y = W x + lora_scale[n] * B_i[n] @ (A_i[n] @ x); A_i [N,R,in], B_i [N,out,R]",
            "padding": "ranks below R are zero-padded"}


class RuntimeLoraTextEncoder(torch.nn.Module):
    """The torch function the ``text_encoder_lora`` graph computes: the CLIP text
    encoder (a copy) with per-item LoRA inputs on its self-attention projections;
    ``input_ids`` cast to int64 inside, ``last_hidden_state`` as FP32 (as the plain graph)."""

    def __init__(self, text_encoder: torch.nn.Module):
        super().__init__()
        self.text_encoder = copy.deepcopy(text_encoder).eval()
        self.compute_dtype = next(self.text_encoder.parameters()).dtype
        layers = []
        for name, _ in text_encoder_lora_targets(self.text_encoder):
            wrapper = _RuntimeLoraLinear(self.text_encoder.get_submodule(name))
            self.text_encoder.set_submodule(name, wrapper)
            layers.append(wrapper)
        object.__setattr__(self, "_layers", layers)

    def forward(self, input_ids: torch.Tensor, lora_scale: torch.Tensor, *lora: torch.Tensor) -> torch.Tensor:
        if len(lora) != 2 * len(self._layers):
            raise ValueError(f"expected {2 * len(self._layers)} LoRA tensors, got {len(lora)}")
        for i, layer in enumerate(self._layers):
            layer.lora = (lora[2 * i], lora[2 * i + 1], lora_scale)
        try:
            out = self.text_encoder(input_ids.to(torch.int64), return_dict=False)[0]
        finally:
            for layer in self._layers:
                layer.lora = None
        return out.float()


def runtime_lora_text_encoder_io(dims: ModelDims, manifest: Mapping) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of the text-encoder graph: ``input_ids``, then ``lora_scale`` and each layer's A, B."""
    inputs, outputs = model_io("text_encoder", dims)
    inputs = [*inputs, TensorSpec(SCALE_INPUT, "FP32", ("N",))]
    for layer in manifest["layers"]:
        inputs.append(TensorSpec(layer["a"], "FP32", tuple(layer["a_dims"])))
        inputs.append(TensorSpec(layer["b"], "FP32", tuple(layer["b_dims"])))
    return inputs, outputs


def export_runtime_lora_text_encoder(text_encoder: torch.nn.Module, out_dir: str | os.PathLike, *, dims: ModelDims,
                                     rank: int = 32, fp16: bool = False, opset: int = DEFAULT_OPSET, batch: int = 2,
                                     external_threshold: int = EXTERNAL_DATA_THRESHOLD) -> Path:
    """Write ``<out_dir>/text_encoder_lora/{model.onnx, io.json, lora_manifest.json}``."""
    if not isinstance(rank, int) or rank < 1:
        raise InvalidInputError("text-encoder LoRA rank", f"must be an integer >= 1, got {rank!r}")
    manifest = build_manifest(text_encoder, rank, component="text_encoder")
    if fp16:
        text_encoder = copy.deepcopy(text_encoder)
        if hasattr(text_encoder, "set_attn_implementation"):
            text_encoder.set_attn_implementation("eager")  # as export_model: causal SDPA mixes fp32 into fp16
        text_encoder = text_encoder.half()
    module = RuntimeLoraTextEncoder(text_encoder)
    inputs, outputs = runtime_lora_text_encoder_io(dims, manifest)
    example = example_inputs(inputs, dims, batch=batch)
    info = {"model": TEXT_ENCODER_MODEL_NAME, "fp16_weights": fp16, "lora_rank": rank,
            "notes": "runtime LoRA text encoder: see lora_manifest.json; input_ids cast to int64 inside the graph"}
    return export_graph(module, inputs, outputs, example, Path(out_dir) / TEXT_ENCODER_MODEL_NAME, opset=opset,
                        info=info, external_threshold=external_threshold, extra_files={MANIFEST_FILE: manifest})
