"""Export the diffusion nets to ONNX with the Triton tensor contract.

One folder per model under the output folder::

    <out>/text_encoder/{model.onnx, io.json}
    <out>/unet/{model.onnx[, model.onnx.data], io.json}
    <out>/vae_decoder/...   <out>/vae_encoder/...
    <out>/export_manifest.json

Contracts (``N`` batch, ``h, w`` latent side, ``H, W`` = 8·h, 8·w image side;
all dynamic):

* ``text_encoder``: ``input_ids INT32[N,77]`` -> ``last_hidden_state FP32[N,77,C]``
  (cast to int64 inside the graph).
* ``unet``: ``sample FP32[N,4,h,w]``, ``timestep FP32[N]``,
  ``encoder_hidden_states FP32[N,77,C]`` -> ``noise_pred FP32[N,4,h,w]``.
  The timestep is **per sample, FP32 [N]**: Triton's dynamic batcher can then
  put requests at different denoising steps into one batch, and a scalar
  timestep is just ``np.full(N, t)``. ``h`` and ``w`` must be multiples of
  ``2**(len(block_out_channels)-1)`` (8 for SD-1.5): the trace fixes the
  UNet's "upsample size" branch for them.
* ``vae_decoder``: ``latent FP32[N,4,h,w]`` -> ``images UINT8[N,H,W,3]``:
  ``1/scaling_factor``, decode, ``(x/2+0.5).clamp(0,1)·255``, round, NHWC —
  the wire format of the whole repository, so the generator passes the
  result on without touching it (and moves 4x fewer bytes than FP32 NCHW).
* ``vae_encoder``: ``images UINT8[N,H,W,3]`` -> ``latent FP32[N,4,h,w]``:
  ``x/127.5-1``, encode, **mean** of the latent distribution x
  ``scaling_factor`` (deterministic; for img2img / template mode).
* ``vae_decoder_tiny`` / ``vae_encoder_tiny`` (``export repository --tiny-vae``):
  the same tensors from diffusers' ``AutoencoderTiny`` (TAESD): the decoder
  graph is the one above; the encoder's latents (deterministic: no
  distribution) x ``scaling_factor`` (1.0: TAESD's latents are on the scale
  of the SD VAE's *scaled* ones, as diffusers' pipelines use them).
* ``controlnet`` and the ``unet``'s control graph (``export repository
  --controlnet``): :mod:`facetron.export.controlnet`.

``torch.onnx.export(..., dynamo=False)`` (the legacy TorchScript exporter,
the one verified with these diffusers/transformers versions), opset >= 17.
Models over ~2 GB (the SD-1.5 UNet) are saved with their weights in ONE
``model.onnx.data`` file next to ``model.onnx``. ``fp16=True`` converts the
weights to half before export while keeping the FP32/INT32/UINT8 I/O
contract (casts inside the graph) — for GPU runtimes; ONNX Runtime on CPU
has few fp16 kernels. Every model folder is built under a temp name and
renamed when complete.

The contracts, example inputs and the trace-and-save step are in
:mod:`facetron.export.onnx_graph` (shared with the runtime-LoRA UNet of
:mod:`facetron.export.runtime_lora`).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch

from facetron.atomic import atomic_write_json
from facetron.errors import InvalidInputError
from facetron.export.merge import ensure_writable_dir
from facetron.export.onnx_graph import (DEFAULT_OPSET, EXTERNAL_DATA_THRESHOLD, MODELS, ModelDims, example_inputs,
                                        export_graph, model_io)
from facetron.export.runtime_lora import export_runtime_lora_unet

MANIFEST_FILE = "export_manifest.json"


# ----------------------------------------------------------------------------- torch wrappers
# These modules ARE the exported functions; validation runs them as the torch reference.


class _Half(torch.nn.Module):
    """Base: remembers the compute dtype so FP32 I/O can wrap fp16 weights."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.compute_dtype = dtype


class TextEncoderGraph(_Half):
    def __init__(self, text_encoder: torch.nn.Module):
        super().__init__(next(text_encoder.parameters()).dtype)
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids.to(torch.int64), return_dict=False)[0].float()


class UNetGraph(_Half):
    def __init__(self, unet: torch.nn.Module):
        super().__init__(next(unet.parameters()).dtype)
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        dt = self.compute_dtype
        out = self.unet(sample.to(dt), timestep, encoder_hidden_states.to(dt), return_dict=False)[0]
        return out.float()


class VaeDecoderGraph(_Half):
    def __init__(self, vae: torch.nn.Module):
        super().__init__(next(vae.parameters()).dtype)
        self.vae = vae
        self.inv_scale = 1.0 / float(vae.config.scaling_factor)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        x = self.vae.decode((latent * self.inv_scale).to(self.compute_dtype), return_dict=False)[0].float()
        x = ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return x.permute(0, 2, 3, 1)


class VaeEncoderGraph(_Half):
    def __init__(self, vae: torch.nn.Module):
        super().__init__(next(vae.parameters()).dtype)
        self.vae = vae
        self.scale = float(vae.config.scaling_factor)
        self.latent_channels = int(vae.config.latent_channels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.permute(0, 3, 1, 2).float() / 127.5 - 1.0).to(self.compute_dtype)
        h = self.vae.encoder(x)
        if self.vae.quant_conv is not None:
            h = self.vae.quant_conv(h)
        mean = h[:, : self.latent_channels]  # moments = [mean, logvar]: static slice keeps C static
        return mean.float() * self.scale


class VaeEncoderTinyGraph(_Half):
    """The tiny autoencoder's encoder (AutoencoderTiny, TAESD): deterministic, its latents x
    ``scaling_factor`` (1.0 for TAESD: its latents are on the scale of the SD VAE's scaled ones), as
    diffusers' img2img pipeline scales what ``vae.encode`` gives."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__(next(vae.parameters()).dtype)
        self.vae = vae
        self.scale = float(vae.config.scaling_factor)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.permute(0, 3, 1, 2).float() / 127.5 - 1.0).to(self.compute_dtype)
        return self.vae.encode(x, return_dict=False)[0].float() * self.scale


def graph_module(name: str, *, unet=None, vae=None, text_encoder=None) -> torch.nn.Module:
    """The torch module that ``name``'s ONNX graph computes (``vae``: the tiny autoencoder for the ``*_tiny``
    nets; its decoder graph is the full VAE's: ``1/scaling_factor``, decode, the same uint8 rounding)."""
    build = {"text_encoder": lambda: TextEncoderGraph(text_encoder), "unet": lambda: UNetGraph(unet),
             "vae_decoder": lambda: VaeDecoderGraph(vae), "vae_encoder": lambda: VaeEncoderGraph(vae),
             "vae_decoder_tiny": lambda: VaeDecoderGraph(vae), "vae_encoder_tiny": lambda: VaeEncoderTinyGraph(vae)}
    return build[name]().eval()


def export_model(name: str, out_dir: str | os.PathLike, *, unet=None, vae=None, text_encoder=None,
                 dims: ModelDims, fp16: bool = False, opset: int = DEFAULT_OPSET, batch: int = 2,
                 external_threshold: int = EXTERNAL_DATA_THRESHOLD) -> Path:
    """Export one of :data:`MODELS` or ``onnx_graph.TINY_VAE_NETS`` (``vae``: the AutoencoderTiny) into
    ``<out_dir>/<name>/``."""
    parts = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
    needed = {"text_encoder": "text_encoder", "unet": "unet"}.get(name, "vae")  # the VAEs, full or tiny
    if parts[needed] is None:
        raise InvalidInputError(name, f"needs the {needed} module")
    if fp16:
        parts[needed] = copy.deepcopy(parts[needed])
        if name == "text_encoder" and hasattr(parts[needed], "set_attn_implementation"):
            # the legacy exporter's causal-SDPA symbolic mixes float32 into an fp16 graph (ORT rejects
            # the LayerNorm types); eager attention exports cleanly
            parts[needed].set_attn_implementation("eager")
        parts[needed] = parts[needed].half()
    module = graph_module(name, **parts)
    inputs, outputs = model_io(name, dims)
    example = example_inputs(inputs, dims, batch=batch)
    info = {"model": name, "fp16_weights": fp16, "notes": _NOTES.get(name, "")}
    return export_graph(module, inputs, outputs, example, Path(out_dir) / name, opset=opset, info=info,
                        external_threshold=external_threshold)


_NOTES = {
    "text_encoder": "input_ids cast to int64 inside the graph",
    "unet": "timestep is per sample, FP32 [N]; h, w multiples of the UNet's down factor",
    "vae_decoder": "latent / scaling_factor inside; images = round(clamp(x/2+0.5, 0, 1) * 255) as UINT8 NHWC RGB",
    "vae_encoder": "images UINT8 NHWC RGB -> mean of the latent distribution * scaling_factor",
    "vae_decoder_tiny": "AutoencoderTiny (TAESD): latent / scaling_factor inside (1.0: TAESD's latents are the SD "
                        "VAE's scaled ones); images = round(clamp(x/2+0.5, 0, 1) * 255) as UINT8 NHWC RGB",
    "vae_encoder_tiny": "AutoencoderTiny (TAESD): images UINT8 NHWC RGB -> its (deterministic) latents * "
                        "scaling_factor",
}


def export_onnx(base_model, out_dir: str | os.PathLike, *, models: Sequence[str] = MODELS, unet=None,
                text_encoder=None, fp16: bool = False, opset: int = DEFAULT_OPSET,
                runtime_lora_rank: int | None = None, provenance: dict | None = None,
                external_threshold: int = EXTERNAL_DATA_THRESHOLD) -> dict:
    """Export ``models`` of ``base_model`` (UNet / text encoder overridable, e.g. merged ones).

    ``runtime_lora_rank``: also export ``unet_lora/`` (see
    :mod:`facetron.export.runtime_lora`) from the *base* UNet. Returns the
    manifest, also written to ``<out_dir>/export_manifest.json``."""
    for name in models:
        if name not in MODELS:
            raise InvalidInputError("--models", f"unknown model '{name}' (expected one of {', '.join(MODELS)})")
    out = ensure_writable_dir(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dims = ModelDims.of(base_model)
    parts = dict(unet=unet if unet is not None else base_model.unet, vae=base_model.vae,
                 text_encoder=text_encoder if text_encoder is not None else base_model.text_encoder)
    written = {}
    for name in models:
        print(f"[export] {name} ...", flush=True)
        path = export_model(name, out, dims=dims, fp16=fp16, opset=opset, external_threshold=external_threshold, **parts)
        written[name] = str(path.relative_to(out))
    if runtime_lora_rank:
        print("[export] unet_lora (runtime LoRA) ...", flush=True)
        path = export_runtime_lora_unet(base_model.unet, out, dims=dims, rank=runtime_lora_rank, fp16=fp16,
                                        opset=opset, external_threshold=external_threshold)
        written["unet_lora"] = str(path.relative_to(out))
    return update_manifest(out, written, dims=dims, fp16=fp16, opset=opset, provenance=provenance)


def update_manifest(out: Path, written: dict[str, str], *, dims: ModelDims, fp16: bool, opset: int,
                    provenance: dict | None) -> dict:
    """Merge this run's models into ``export_manifest.json`` (atomic rewrite)."""
    path = out / MANIFEST_FILE
    manifest = json.loads(path.read_text()) if path.is_file() else {"models": {}}
    manifest["models"].update({k: {"path": v, "fp16_weights": fp16, "opset": opset} for k, v in written.items()})
    manifest["dims"] = asdict(dims)
    if provenance is not None:
        manifest["source"] = provenance
    if (provenance or {}).get("base_model", {}).get("smoke_model"):
        manifest["note"] = "tiny smoke-test model with random weights: its pictures are not portraits"
    atomic_write_json(path, manifest)
    return manifest


def read_manifest(onnx_dir: str | os.PathLike) -> dict:
    path = Path(onnx_dir) / MANIFEST_FILE
    if not path.is_file():
        raise InvalidInputError(f"--onnx-dir {Path(onnx_dir)}", f"has no {MANIFEST_FILE} (run 'facetron export onnx' first)")
    return json.loads(path.read_text())
