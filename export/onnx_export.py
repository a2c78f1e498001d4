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

``torch.onnx.export(..., dynamo=False)`` (the legacy TorchScript exporter,
the one verified with these diffusers/transformers versions), opset >= 17.
Models over ~2 GB (the SD-1.5 UNet) are saved with their weights in ONE
``model.onnx.data`` file next to ``model.onnx``. ``fp16=True`` converts the
weights to half before export while keeping the FP32/INT32/UINT8 I/O
contract (casts inside the graph) — for GPU runtimes; ONNX Runtime on CPU
has few fp16 kernels. Every model folder is built under a temp name and
renamed when complete.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from facetron.atomic import atomic_dir, atomic_write_json
from facetron.errors import InvalidInputError

DEFAULT_OPSET = 17
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
IO_FILE = "io.json"
MANIFEST_FILE = "export_manifest.json"
TEXT_LEN = 77
MODELS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
# protobuf cannot hold more than 2 GiB: above this many weight bytes use external data.
EXTERNAL_DATA_THRESHOLD = int(1.8 * 2**30)
# symbolic dims: N batch, h/w latent side, H/W image side
SYMBOLS = ("N", "h", "w", "H", "W")


@dataclass(frozen=True)
class TensorSpec:
    """One graph input/output: name, Triton data type, dims (ints or symbols)."""

    name: str
    dtype: str  # "FP32" | "FP16" | "INT32" | "INT64" | "UINT8"
    dims: tuple[int | str, ...]

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims)}

    @classmethod
    def from_json(cls, d: dict) -> "TensorSpec":
        return cls(d["name"], d["dtype"], tuple(d["dims"]))

    def shape(self, **sizes: int) -> tuple[int, ...]:
        """Concrete shape with symbols replaced, e.g. ``shape(N=2, h=64, w=64)``."""
        return tuple(sizes[d] if isinstance(d, str) else int(d) for d in self.dims)


NUMPY_DTYPES = {"FP32": np.float32, "FP16": np.float16, "INT32": np.int32, "INT64": np.int64, "UINT8": np.uint8}


@dataclass(frozen=True)
class ModelDims:
    """The numbers of a base model that the contracts depend on."""

    text_hidden: int  # C of last_hidden_state / encoder_hidden_states
    unet_in_channels: int
    unet_out_channels: int
    latent_channels: int
    latent_factor: int  # image side / latent side
    latent_size: int  # default latent side for example inputs
    scaling_factor: float

    @classmethod
    def of(cls, base_model) -> "ModelDims":
        u, v = base_model.unet.config, base_model.vae.config
        return cls(text_hidden=int(base_model.text_encoder.config.hidden_size), unet_in_channels=int(u.in_channels),
                   unet_out_channels=int(u.out_channels), latent_channels=int(v.latent_channels),
                   latent_factor=int(base_model.latent_factor),
                   latent_size=int(base_model.resolution) // int(base_model.latent_factor),
                   scaling_factor=float(v.scaling_factor))


def model_io(name: str, dims: ModelDims) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of ``name`` — the single source for export, validation and TensorRT shapes."""
    C = dims.text_hidden
    if name == "text_encoder":
        return [TensorSpec("input_ids", "INT32", ("N", TEXT_LEN))], [TensorSpec("last_hidden_state", "FP32", ("N", TEXT_LEN, C))]
    if name == "unet":
        return ([TensorSpec("sample", "FP32", ("N", dims.unet_in_channels, "h", "w")),
                 TensorSpec("timestep", "FP32", ("N",)),
                 TensorSpec("encoder_hidden_states", "FP32", ("N", TEXT_LEN, C))],
                [TensorSpec("noise_pred", "FP32", ("N", dims.unet_out_channels, "h", "w"))])
    if name == "vae_decoder":
        return [TensorSpec("latent", "FP32", ("N", dims.latent_channels, "h", "w"))], [TensorSpec("images", "UINT8", ("N", "H", "W", 3))]
    if name == "vae_encoder":
        return [TensorSpec("images", "UINT8", ("N", "H", "W", 3))], [TensorSpec("latent", "FP32", ("N", dims.latent_channels, "h", "w"))]
    raise InvalidInputError("--models", f"unknown model '{name}' (expected one of {', '.join(MODELS)})")


def dynamic_axes(specs: Sequence[TensorSpec]) -> dict[str, dict[int, str]]:
    return {s.name: {i: d for i, d in enumerate(s.dims) if isinstance(d, str)} for s in specs}


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


def graph_module(name: str, *, unet=None, vae=None, text_encoder=None) -> torch.nn.Module:
    """The torch module that ``name``'s ONNX graph computes."""
    build = {"text_encoder": lambda: TextEncoderGraph(text_encoder), "unet": lambda: UNetGraph(unet),
             "vae_decoder": lambda: VaeDecoderGraph(vae), "vae_encoder": lambda: VaeEncoderGraph(vae)}
    return build[name]().eval()


def example_inputs(specs: Sequence[TensorSpec], dims: ModelDims, *, batch: int = 2, latent: int | None = None,
                   seed: int = 0, vocab: int = 49408) -> dict[str, np.ndarray]:
    """Seeded inputs of the right shapes/dtypes/ranges for ``specs``."""
    rng = np.random.default_rng(seed)
    h = latent or dims.latent_size
    sizes = dict(N=batch, h=h, w=h, H=h * dims.latent_factor, W=h * dims.latent_factor)
    out = {}
    for s in specs:
        shape = s.shape(**sizes)
        if s.name == "input_ids":
            ids = rng.integers(0, vocab - 2, size=shape)
            ids[:, 0], ids[:, -1] = vocab - 2, vocab - 1  # BOS ... EOS like a tokenizer
            out[s.name] = ids.astype(np.int32)
        elif s.name == "timestep":
            out[s.name] = rng.integers(1, 1000, size=shape).astype(np.float32)
        elif s.dtype == "UINT8":
            out[s.name] = rng.integers(0, 256, size=shape).astype(np.uint8)
        elif s.name == "lora_scale":
            out[s.name] = np.ones(shape, np.float32)
        elif s.name.startswith("lora_"):
            out[s.name] = (0.05 * rng.standard_normal(shape)).astype(NUMPY_DTYPES[s.dtype])
        else:
            out[s.name] = rng.standard_normal(shape).astype(NUMPY_DTYPES[s.dtype])
    return out


# ----------------------------------------------------------------------------- writing


def _write_onnx(model, path: Path, external: bool) -> None:
    """Save ``model``; weights in one ``model.onnx.data`` beside it when ``external``."""
    import onnx

    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def _weight_bytes(model) -> int:
    import onnx

    return sum(int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
               for t in model.graph.initializer)


def export_graph(module: torch.nn.Module, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 example: dict[str, np.ndarray], model_dir: str | os.PathLike, *, opset: int = DEFAULT_OPSET,
                 info: dict | None = None, external_threshold: int = EXTERNAL_DATA_THRESHOLD,
                 extra_files: dict[str, dict] | None = None) -> Path:
    """Trace ``module`` to ``<model_dir>/model.onnx`` (+ ``io.json``), atomically.

    ``extra_files``: more JSON files written into the same folder."""
    import onnx

    if opset < 17:
        raise InvalidInputError("--opset", f"must be >= 17 (LayerNorm/attention export), got {opset}")
    model_dir = Path(model_dir)
    args = tuple(torch.from_numpy(example[s.name]) for s in inputs)
    t0 = time.perf_counter()
    try:
        with atomic_dir(model_dir) as tmp:
            scratch = tmp / ".torch_export"
            scratch.mkdir()
            with torch.no_grad(), warnings.catch_warnings():
                # expected noise of the legacy tracer: shape asserts become constants, it is "deprecated"
                warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                warnings.filterwarnings("ignore", message=".*Constant folding - Only steps=1.*")
                torch.onnx.export(module, args, str(scratch / MODEL_FILE), input_names=[s.name for s in inputs],
                                  output_names=[s.name for s in outputs], dynamic_axes=dynamic_axes([*inputs, *outputs]),
                                  opset_version=opset, do_constant_folding=True, dynamo=False)
            model = onnx.load(str(scratch / MODEL_FILE))  # also reads the per-tensor files torch writes > 2 GB
            shutil.rmtree(scratch)
            _fix_output_dims(model, outputs)
            external = _weight_bytes(model) > external_threshold
            _write_onnx(model, tmp / MODEL_FILE, external)
            del model
            onnx.checker.check_model(str(tmp / MODEL_FILE))
            io = {"inputs": [s.to_json() for s in inputs], "outputs": [s.to_json() for s in outputs],
                  "opset": opset, "external_data": DATA_FILE if external else None,
                  "export_seconds": round(time.perf_counter() - t0, 2), **(info or {})}
            atomic_write_json(tmp / IO_FILE, io)
            for name, obj in (extra_files or {}).items():
                atomic_write_json(tmp / name, obj)
    except OSError as exc:
        raise InvalidInputError(f"--out {model_dir.parent}", f"could not write {model_dir.name}/ ({exc})") from None
    return model_dir / MODEL_FILE


def _fix_output_dims(model, outputs: Sequence[TensorSpec]) -> None:
    """Write the contract's dims into the graph outputs (the tracer invents names like 'Mullatent_dim_1')."""
    by_name = {s.name: s for s in outputs}
    for out in model.graph.output:
        spec = by_name.get(out.name)
        if spec is None:
            continue
        shape = out.type.tensor_type.shape
        if len(shape.dim) != len(spec.dims):
            continue
        for dim, want in zip(shape.dim, spec.dims):
            if isinstance(want, str):
                dim.dim_param = want
            else:
                dim.dim_value = int(want)


def read_io(model_dir: str | os.PathLike) -> tuple[list[TensorSpec], list[TensorSpec], dict]:
    """(inputs, outputs, whole io.json) of an exported model folder."""
    path = Path(model_dir) / IO_FILE
    if not path.is_file():
        raise InvalidInputError(f"export folder {Path(model_dir)}", f"has no {IO_FILE} (not written by facetron export)")
    io = json.loads(path.read_text())
    return [TensorSpec.from_json(d) for d in io["inputs"]], [TensorSpec.from_json(d) for d in io["outputs"]], io


def export_model(name: str, out_dir: str | os.PathLike, *, unet=None, vae=None, text_encoder=None,
                 dims: ModelDims, fp16: bool = False, opset: int = DEFAULT_OPSET, batch: int = 2,
                 external_threshold: int = EXTERNAL_DATA_THRESHOLD) -> Path:
    """Export one of :data:`MODELS` into ``<out_dir>/<name>/``."""
    parts = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
    needed = {"text_encoder": "text_encoder", "unet": "unet", "vae_decoder": "vae", "vae_encoder": "vae"}[name]
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
}


def export_onnx(base_model, out_dir: str | os.PathLike, *, models: Sequence[str] = MODELS, unet=None,
                text_encoder=None, fp16: bool = False, opset: int = DEFAULT_OPSET,
                runtime_lora_rank: int | None = None, provenance: dict | None = None,
                external_threshold: int = EXTERNAL_DATA_THRESHOLD) -> dict:
    """Export ``models`` of ``base_model`` (UNet / text encoder overridable, e.g. merged ones).

    ``runtime_lora_rank``: also export ``unet_lora/`` (see
    :mod:`facetron.export.runtime_lora`) from the *base* UNet. Returns the
    manifest, also written to ``<out_dir>/export_manifest.json``."""
    from facetron.export.merge import ensure_writable_dir

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
        from facetron.export.runtime_lora import export_runtime_lora_unet

        print("[export] unet_lora (runtime LoRA) ...", flush=True)
        path = export_runtime_lora_unet(base_model.unet, out, dims=dims, rank=runtime_lora_rank, fp16=fp16,
                                        opset=opset, external_threshold=external_threshold)
        written["unet_lora"] = str(path.relative_to(out))
    return update_manifest(out, written, dims=dims, fp16=fp16, opset=opset, provenance=provenance)


def update_manifest(out: Path, written: dict[str, str], *, dims: ModelDims, fp16: bool, opset: int,
                    provenance: dict | None) -> dict:
    """Merge this run's models into ``export_manifest.json`` (atomic rewrite)."""
    from dataclasses import asdict

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
