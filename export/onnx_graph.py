"""Graph primitives of the ONNX export: tensor contracts, example inputs, tracing + saving.

Shared by :mod:`facetron.export.onnx_export` (the base nets) and
:mod:`facetron.export.runtime_lora` (the runtime-LoRA UNet):

* :class:`TensorSpec` (one input/output: name, Triton dtype, dims with the
  symbols ``N`` batch, ``h, w`` latent side, ``H, W`` image side) and
  :class:`ModelDims` (the base model's numbers the contracts depend on);
* :func:`model_io` (the contract of each of :data:`MODELS`),
  :func:`dynamic_axes`, :func:`example_inputs`;
* :func:`export_graph` (trace a torch module to ``<dir>/model.onnx`` +
  ``io.json``, atomically, weights in one ``model.onnx.data`` above
  :data:`EXTERNAL_DATA_THRESHOLD`) and :func:`read_io`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import torch

from facetron.atomic import atomic_dir, atomic_write_json
from facetron import contract
from facetron.contract import IO_FILE, MODEL_FILE, NUMPY_DTYPES as CONTRACT_DTYPES, TOKENS, VOCAB_SIZE
from facetron.errors import InvalidInputError

DEFAULT_OPSET = 17
DATA_FILE = "model.onnx.data"
#: the exported nets, each in a folder named like the served model it becomes
MODELS = tuple(c.name for c in (contract.TEXT_ENCODER, contract.UNET, contract.VAE_DECODER, contract.VAE_ENCODER))
#: the tiny autoencoder's nets (AutoencoderTiny, ``export repository --tiny-vae``): the full VAEs' tensors
TINY_VAE_NETS = (contract.VAE_DECODER_TINY.name, contract.VAE_ENCODER_TINY.name)
# protobuf cannot hold more than 2 GiB: above this many weight bytes use external data.
EXTERNAL_DATA_THRESHOLD = int(1.8 * 2**30)
# symbolic dims: N batch, h/w latent side, H/W image side, R runtime-LoRA rank ("3R": 3 slots of R side by side)
SYMBOLS = ("N", "h", "w", "H", "W", "R")


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
        """Concrete shape with symbols replaced, e.g. ``shape(N=2, h=64, w=64)``; a multiple such as
        ``"3R"`` is 3 x ``R``."""
        return tuple(symbol_size(d, sizes) if isinstance(d, str) else int(d) for d in self.dims)


def symbol_size(dim: str, sizes: dict[str, int]) -> int:
    """The size of symbolic dim ``dim``: ``sizes[dim]``, or ``k * sizes[S]`` for ``"<k><S>"``."""
    if dim in sizes:
        return sizes[dim]
    k = dim.rstrip("".join(SYMBOLS))
    if not k.isdigit() or dim[len(k):] not in sizes:
        raise KeyError(dim)
    return int(k) * sizes[dim[len(k):]]


NUMPY_DTYPES = {**CONTRACT_DTYPES, "FP16": "float16"}  # the contract's, + the exported graphs' fp16


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
    if name in TINY_VAE_NETS:
        return model_io(name.removesuffix("_tiny"), dims)
    if name == "text_encoder":
        return [TensorSpec("input_ids", "INT32", ("N", TOKENS))], [TensorSpec("last_hidden_state", "FP32", ("N", TOKENS, C))]
    if name == "unet":
        return ([TensorSpec("sample", "FP32", ("N", dims.unet_in_channels, "h", "w")),
                 TensorSpec("timestep", "FP32", ("N",)),
                 TensorSpec("encoder_hidden_states", "FP32", ("N", TOKENS, C))],
                [TensorSpec("noise_pred", "FP32", ("N", dims.unet_out_channels, "h", "w"))])
    if name == "vae_decoder":
        return [TensorSpec("latent", "FP32", ("N", dims.latent_channels, "h", "w"))], [TensorSpec("images", "UINT8", ("N", "H", "W", 3))]
    if name == "vae_encoder":
        return [TensorSpec("images", "UINT8", ("N", "H", "W", 3))], [TensorSpec("latent", "FP32", ("N", dims.latent_channels, "h", "w"))]
    raise InvalidInputError("--models", f"unknown model '{name}' (expected one of {', '.join(MODELS)})")


def dynamic_axes(specs: Sequence[TensorSpec]) -> dict[str, dict[int, str]]:
    """``torch.onnx.export``'s ``dynamic_axes``: every symbolic dim of every spec, by name and position."""
    return {s.name: {i: d for i, d in enumerate(s.dims) if isinstance(d, str)} for s in specs}


def example_inputs(specs: Sequence[TensorSpec], dims: ModelDims, *, batch: int = 2, latent: int | None = None,
                   seed: int = 0, vocab: int = VOCAB_SIZE, rank: int = 4) -> dict[str, np.ndarray]:
    """Seeded inputs of the right shapes/dtypes/ranges for ``specs`` (``rank``: the runtime-LoRA ``R``)."""
    rng = np.random.default_rng(seed)
    h = latent or dims.latent_size
    sizes = dict(N=batch, h=h, w=h, H=h * dims.latent_factor, W=h * dims.latent_factor, R=rank)
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
        elif s.name.startswith("lora_"):
            out[s.name] = (0.05 * rng.standard_normal(shape)).astype(NUMPY_DTYPES[s.dtype])
        else:
            out[s.name] = rng.standard_normal(shape).astype(NUMPY_DTYPES[s.dtype])
    return out


# ----------------------------------------------------------------------------- writing


def _write_onnx(model, path: Path, external: bool, src_dir: Path) -> None:
    """Save ``model`` as ``path``; its weights are still where torch wrote them (inline, or per-tensor files in
    ``src_dir``). ``external``: every initializer of 1 KiB or more goes into one ``<path>.data``, copied one
    tensor at a time (never all weights in memory at once); else all of them inline."""
    from onnx.external_data_helper import uses_external_data

    if not external:
        onnx.load_external_data_for_model(model, str(src_dir))
        onnx.save_model(model, str(path))
        return
    data_name = path.name + ".data"
    with open(path.parent / data_name, "wb") as data:
        for tensor in model.graph.initializer:
            if uses_external_data(tensor):
                info = {e.key: e.value for e in tensor.external_data}
                with open(src_dir / info["location"], "rb") as src:
                    src.seek(int(info.get("offset", 0)))
                    raw = src.read(int(info["length"])) if "length" in info else src.read()
            elif len(tensor.raw_data) >= 1024:
                raw = tensor.raw_data
            else:
                continue
            offset = data.tell()
            data.write(raw)
            del tensor.external_data[:]
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.data_location = onnx.TensorProto.EXTERNAL
            tensor.ClearField("raw_data")
    onnx.save_model(model, str(path))


def _weight_bytes(model) -> int:
    return sum(int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
               for t in model.graph.initializer)


def export_graph(module: torch.nn.Module, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 example: dict[str, np.ndarray], model_dir: str | os.PathLike, *, opset: int = DEFAULT_OPSET,
                 info: dict | None = None, external_threshold: int = EXTERNAL_DATA_THRESHOLD,
                 extra_files: dict[str, dict] | None = None) -> Path:
    """Trace ``module`` to ``<model_dir>/model.onnx`` (+ ``io.json``), atomically.

    ``extra_files``: more JSON files written into the same folder."""
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
            model = onnx.load(str(scratch / MODEL_FILE), load_external_data=False)  # the graph, not the weights
            _fix_output_dims(model, outputs)
            external = _weight_bytes(model) > external_threshold
            _write_onnx(model, tmp / MODEL_FILE, external, scratch)
            del model
            shutil.rmtree(scratch)
            onnx.checker.check_model(str(tmp / MODEL_FILE))
            io = {"inputs": [s.to_json() for s in inputs], "outputs": [s.to_json() for s in outputs],
                  "opset": opset, "external_data": DATA_FILE if external else None,
                  "export_seconds": round(time.perf_counter() - t0, 2), **(info or {})}
            down = unet_down_factor(module) if any(s.name == "sample" for s in inputs) else None
            if down is not None:  # what the served model checks a sample's sides against (net_io.read_down_factor)
                io[contract.UNET_DOWN_FACTOR] = down
            atomic_write_json(tmp / IO_FILE, io)
            for name, obj in (extra_files or {}).items():
                atomic_write_json(tmp / name, obj)
    except OSError as exc:
        raise InvalidInputError(f"--out {model_dir.parent}", f"could not write {model_dir.name}/ ({exc})") from None
    return model_dir / MODEL_FILE


def unet_down_factor(module: torch.nn.Module) -> int | None:
    """How many latent cells of a ``sample`` side the diffusers UNet (or ControlNet) inside ``module``
    folds into one at its deepest block: 2 ** (its down blocks with a downsampler) = 2 ** (len(block_out_channels)
    - 1) (8 for SD-1.5, 2 for the tiny default). The traced graph's skip connections concatenate at these
    fixed halvings, so a sample's sides must be multiples of it. None: ``module`` holds no such net."""
    for m in module.modules():
        blocks, config = getattr(m, "down_blocks", None), getattr(m, "config", None)
        if blocks is not None and hasattr(config, "block_out_channels"):
            return 2 ** sum(1 for b in blocks if getattr(b, "downsamplers", None) is not None)
    return None


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
