"""Step caching (DeepCache, arXiv 2312.00858): the UNet as two graphs, torch side and export.

One concept at two layers: this module builds and exports the two graphs
(torch); the schedule and :class:`~facetron.diffusion.step_cache.CachedUNet`,
which runs them in the sampler (numpy, served), are
:mod:`facetron.diffusion.step_cache`.

The UNet's forward (diffusers' ``UNet2DConditionModel.forward``) is split at
the input of its last up block::

    shallow part: time embedding, conv_in, down_blocks[0]      -> skips
    deep part:    down_blocks[1:], mid_block, up_blocks[:-1]    -> deep_feature
    shallow part: up_blocks[-1](deep_feature, skips), conv_norm_out/act/conv_out -> noise_pred

* ``full(sample, timestep, encoder_hidden_states[, lora...])
  -> (noise_pred, deep_feature)`` runs all of it (``noise_pred`` is the UNet's
  output; ``deep_feature`` FP32 ``[N, C, h, w]`` is the hidden state after
  ``up_blocks[-2]``, C = that block's output channels: 640 for SD-1.5);
* ``shallow(sample, timestep, encoder_hidden_states, deep_feature[, lora...])
  -> noise_pred`` runs the shallow part only, the deep part replaced by a
  feature cached at an earlier step. Given the feature of ``full`` on the same
  inputs it *is* the full UNet (same operations, same order).

``skips`` are ``conv_in``'s output and ``down_blocks[0]``'s residual samples:
the first ``len(up_blocks[-1].resnets)`` residual samples of the forward,
which its last up block consumes. ``down_blocks[0]``'s downsampler feeds the
deep part only; the shallow graph does not compute it (the ONNX exporter drops
unused operations).

:class:`DeepCacheUNet` wraps a plain diffusers UNet or a
:class:`~facetron.export.runtime_lora.RuntimeLoraUNet`; for the latter both
graphs take the runtime-LoRA inputs after their own (in the order
:func:`~facetron.export.runtime_lora.runtime_lora_io` lists them) and see
them through :meth:`RuntimeLoraUNet.bound`. The torch
``shallow`` takes the same LoRA inputs as ``full``; the *exported* shallow
graph takes only those its layers read (the ONNX exporter drops inputs
nothing reads, so they are left out explicitly, found by autograd:
:func:`used_lora_inputs`, whatever the LoRA input layout). ``io.json``
lists its inputs and ``deep_cache.unused_inputs`` the ones left out; a feed
must leave those out too (ONNX Runtime refuses unknown inputs).

:func:`export_runtime_lora_deep_cache_unet` writes the served ``unet``
(:data:`SERVED_UNET_FOLDERS`): the full graph in ``<out>/unet/``, the shallow
graph in ``<out>/unet/shallow/``, the layout of the unet's version folder
(``unet/1/``, ``unet/1/shallow/``), each with the ``lora_manifest.json`` of
``unet_lora``. :func:`export_deep_cache_unet` writes the plain pair (no LoRA
inputs, not served: tests and measurements) to ``<out>/unet_deep/`` and
``<out>/unet_shallow/`` (:data:`PLAIN_UNET_FOLDERS`).
"""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import Iterator, Sequence

import torch

from facetron.contract import RUNTIME_LORA_UNETS, SHALLOW_FOLDER, UNET
from facetron.diffusion.lora_inputs import MANIFEST_FILE
from facetron.diffusion.step_cache import DEEP_FEATURE
from facetron.errors import InvalidInputError
from facetron.export.onnx_graph import (DEFAULT_OPSET, EXTERNAL_DATA_THRESHOLD, ModelDims, TensorSpec, example_inputs,
                                        export_graph, model_io)
from facetron.export.runtime_lora import RuntimeLoraUNet, adapted, build_manifest, runtime_lora_io

#: folders of the exported graph pairs (full, shallow) under the output folder: the runtime-LoRA pair is the
#: served ``unet`` (its shallow graph inside it, as in the version folder); the plain pair is not served
SERVED_UNET_FOLDERS = (UNET.name, f"{UNET.name}/{SHALLOW_FOLDER}")
PLAIN_UNET_FOLDERS = ("unet_deep", "unet_shallow")

SPLIT_NOTE = ("DeepCache split at the input of up_blocks[-1]: shallow = time embedding, conv_in, down_blocks[0], "
              "up_blocks[-1], conv_norm_out/conv_act/conv_out; deep = down_blocks[1:], mid_block, up_blocks[:-1]")


# ----------------------------------------------------------------------------- the split


def check_supported(unet: torch.nn.Module) -> None:
    """Raise InvalidInputError (a ValueError) for a UNet whose forward the split does not reproduce."""
    from diffusers import UNet2DConditionModel

    if not isinstance(unet, UNet2DConditionModel):
        raise InvalidInputError("unet", "step caching needs a diffusers UNet2DConditionModel, "
                                        f"got {type(unet).__name__}")
    cfg = unet.config
    unsupported = {
        "class embedding (class_embed_type / num_class_embeds)": unet.class_embedding is not None,
        f"addition embedding (addition_embed_type={cfg.addition_embed_type!r})":
            getattr(unet, "add_embedding", None) is not None or cfg.addition_embed_type is not None,
        f"encoder_hid_proj (encoder_hid_dim_type={cfg.encoder_hid_dim_type!r})": unet.encoder_hid_proj is not None,
        f"GLIGEN position net (attention_type={cfg.attention_type!r})":
            getattr(unet, "position_net", None) is not None or cfg.attention_type != "default",
    }
    for feature, present in unsupported.items():
        if present:
            raise InvalidInputError("unet", f"step caching does not handle a UNet with {feature}")
    if len(unet.down_blocks) < 2 or len(unet.up_blocks) != len(unet.down_blocks):
        raise InvalidInputError("unet", f"step caching needs >= 2 down blocks and as many up blocks, got "
                                        f"{len(unet.down_blocks)} down / {len(unet.up_blocks)} up")
    n_res = 1 + sum(_res_count(b) for b in unet.down_blocks)
    if n_res != sum(len(b.resnets) for b in unet.up_blocks):
        raise InvalidInputError("unet", f"its up blocks do not consume its {n_res} residual samples one for one")
    if len(unet.up_blocks[-1].resnets) > 1 + _res_count(unet.down_blocks[0]):
        raise InvalidInputError("unet", "its last up block takes skips from below down_blocks[0]: no shallow part")


def _res_count(block: torch.nn.Module) -> int:
    """Residual samples a down block returns: one per resnet, one per downsampler stage."""
    return len(block.resnets) + (1 if getattr(block, "downsamplers", None) is not None else 0)


def feature_channels(unet: torch.nn.Module) -> int:
    """Channels of the deep feature: the output channels of ``up_blocks[-2]``."""
    return int(unet.up_blocks[-2].resnets[-1].out_channels)


def _embed(unet, sample: torch.Tensor, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 0-1 of the forward: the (centered) sample and the time embedding ``emb``."""
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
    emb = unet.time_embedding(t_emb, None)
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    return sample, emb


def _down(block, x: torch.Tensor, emb: torch.Tensor, hidden: torch.Tensor):
    """One down block as the forward calls it: (output, residual samples)."""
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=x, temb=emb, encoder_hidden_states=hidden, attention_mask=None,
                     cross_attention_kwargs=None, encoder_attention_mask=None)
    return block(hidden_states=x, temb=emb)


def _up(block, x: torch.Tensor, res: tuple, emb: torch.Tensor, hidden: torch.Tensor, upsample_size) -> torch.Tensor:
    """One up block as the forward calls it."""
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=x, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=hidden,
                     cross_attention_kwargs=None, upsample_size=upsample_size, attention_mask=None,
                     encoder_attention_mask=None)
    return block(hidden_states=x, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size)


def _forward_upsample_size(unet, sample: torch.Tensor) -> bool:
    """diffusers' rule: pass explicit upsample sizes when h or w is not a multiple of 2**num_upsamplers."""
    factor = 2 ** unet.num_upsamplers
    return any(d % factor != 0 for d in sample.shape[-2:])


def _shallow_down(unet, sample: torch.Tensor, emb: torch.Tensor, hidden: torch.Tensor):
    """Steps 2-3a: ``conv_in`` then ``down_blocks[0]``: (its output, the residual samples so far)."""
    x = unet.conv_in(sample)
    res = (x,)
    x, block_res = _down(unet.down_blocks[0], x, emb, hidden)
    return x, res + tuple(block_res)


def _deep(unet, x: torch.Tensor, res: tuple, emb: torch.Tensor, hidden: torch.Tensor, forward_upsample: bool):
    """Steps 3b-5a: ``down_blocks[1:]``, ``mid_block``, ``up_blocks[:-1]`` consuming residual
    samples from the end: (deep feature, residual samples left, upsample size for the last block)."""
    # 3b. the deep down blocks
    for block in unet.down_blocks[1:]:
        x, block_res = _down(block, x, emb, hidden)
        res += tuple(block_res)
    # 4. mid
    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            x = unet.mid_block(x, emb, encoder_hidden_states=hidden, attention_mask=None, cross_attention_kwargs=None,
                               encoder_attention_mask=None)
        else:
            x = unet.mid_block(x, emb)
    # 5a. every up block but the last
    upsample_size = None
    for block in unet.up_blocks[:-1]:
        block_res, res = res[-len(block.resnets):], res[: -len(block.resnets)]
        if forward_upsample:
            upsample_size = res[-1].shape[2:]
        x = _up(block, x, block_res, emb, hidden, upsample_size)
    return x, res, upsample_size


def _shallow_up(unet, feature: torch.Tensor, skips: tuple, emb: torch.Tensor, hidden: torch.Tensor,
                upsample_size) -> torch.Tensor:
    """Steps 5b-6: ``up_blocks[-1]`` on the deep feature and the skips, then the output layers."""
    x = _up(unet.up_blocks[-1], feature, skips, emb, hidden, upsample_size)
    if unet.conv_norm_out:
        x = unet.conv_act(unet.conv_norm_out(x))
    return unet.conv_out(x)


def unet_full(unet, sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor):
    """The UNet forward in its two parts: (noise_pred, deep feature), in the UNet's dtype."""
    sample, emb = _embed(unet, sample, timestep)
    x, res = _shallow_down(unet, sample, emb, hidden)
    feature, skips, upsample_size = _deep(unet, x, res, emb, hidden, _forward_upsample_size(unet, sample))
    return _shallow_up(unet, feature, skips, emb, hidden, upsample_size), feature


def unet_shallow(unet, sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor,
                 feature: torch.Tensor) -> torch.Tensor:
    """The shallow part on a cached deep feature: noise_pred, in the UNet's dtype."""
    sample, emb = _embed(unet, sample, timestep)
    _, res = _shallow_down(unet, sample, emb, hidden)
    skips = res[: len(unet.up_blocks[-1].resnets)]
    # the size the forward leaves for the last block: that of the residual sample before its skips' end
    upsample_size = skips[-1].shape[2:] if _forward_upsample_size(unet, sample) else None
    return _shallow_up(unet, feature, skips, emb, hidden, upsample_size)


# ----------------------------------------------------------------------------- the torch modules


class DeepCacheUNet(torch.nn.Module):
    """The two DeepCache graphs of a UNet (plain diffusers UNet or :class:`RuntimeLoraUNet`).

    ``full(sample, timestep, hidden, *lora) -> (noise_pred, deep_feature)`` and
    ``shallow(sample, timestep, hidden, deep_feature, *lora) -> noise_pred``,
    FP32 in and out (cast to the UNet's dtype inside, as ``UNetGraph``);
    ``lora`` = the runtime-LoRA inputs in :func:`runtime_lora_io`'s order for
    a runtime-LoRA UNet (handed to its :meth:`RuntimeLoraUNet.bound`), nothing
    for a plain one. :attr:`full_graph` / :attr:`shallow_graph` are the
    modules to export."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.runtime_lora = isinstance(unet, RuntimeLoraUNet)
        self.module = unet.eval()
        object.__setattr__(self, "unet_", unet.unet if self.runtime_lora else unet)  # already registered in module
        check_supported(self.unet_)
        self.compute_dtype = next(self.unet_.parameters()).dtype
        self.feature_channels = feature_channels(self.unet_)
        object.__setattr__(self, "full_graph", _Graph(self, "full"))  # not submodules: no second registration
        object.__setattr__(self, "shallow_graph", _Graph(self, "shallow"))

    @contextlib.contextmanager
    def _bound(self, lora: Sequence[torch.Tensor]) -> Iterator[torch.nn.Module]:
        """The diffusers UNet, with the runtime-LoRA inputs set for the block when there are any."""
        if not self.runtime_lora:
            if lora:
                raise ValueError(f"a plain UNet takes no LoRA inputs, got {len(lora)}")
            yield self.unet_
            return
        with self.module.bound(lora) as unet:
            yield unet

    def full(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
             *lora: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise_pred, deep_feature), both FP32."""
        dt = self.compute_dtype
        with self._bound(lora) as unet:
            pred, feature = unet_full(unet, sample.to(dt), timestep, encoder_hidden_states.to(dt))
        return pred.float(), feature.float()

    def shallow(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                deep_feature: torch.Tensor, *lora: torch.Tensor) -> torch.Tensor:
        """noise_pred (FP32) from the shallow part and a cached ``deep_feature``."""
        dt = self.compute_dtype
        with self._bound(lora) as unet:
            pred = unet_shallow(unet, sample.to(dt), timestep, encoder_hidden_states.to(dt), deep_feature.to(dt))
        return pred.float()

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.full(*args)


class _Graph(torch.nn.Module):
    """``full`` or ``shallow`` of a :class:`DeepCacheUNet` as a module's ``forward`` (what the exporter traces)."""

    def __init__(self, owner: DeepCacheUNet, part: str):
        super().__init__()
        self.owner, self.part = owner, part

    def forward(self, *args: torch.Tensor):
        return getattr(self.owner, self.part)(*args)


# ----------------------------------------------------------------------------- io and export


def feature_spec(channels: int) -> TensorSpec:
    """The cached tensor: FP32 [N, C, h, w] (the latent's side: the last up block does not resample)."""
    return TensorSpec(DEEP_FEATURE, "FP32", ("N", int(channels), "h", "w"))


def deep_cache_io(unet_inputs: Sequence[TensorSpec], unet_outputs: Sequence[TensorSpec], channels: int):
    """((full inputs, outputs), (shallow inputs, outputs)) from the UNet graph's contract: the full graph
    adds ``deep_feature`` to the outputs, the shallow one takes it after the first three inputs."""
    feature = feature_spec(channels)
    full = (list(unet_inputs), [*unet_outputs, feature])
    shallow = ([*unet_inputs[:3], feature, *unet_inputs[3:]], list(unet_outputs))
    return full, shallow


def used_lora_inputs(module: DeepCacheUNet, specs: Sequence[TensorSpec], dims: ModelDims) -> list[bool]:
    """Which of the LoRA inputs ``specs`` (after the UNet's three) the shallow part reads: those
    its output has a gradient for, on a batch of one at a small latent side."""
    side = 2 * 2 ** module.unet_.num_upsamplers  # 2x2 at the deepest level (GroupNorm needs > 1 value)
    ex = example_inputs(specs, dims, batch=1, latent=side)
    args = [torch.from_numpy(ex[s.name]) for s in specs]
    unet_args, lora = args[:3], [t.requires_grad_() for t in args[3:]]
    with torch.enable_grad():
        _, feature = module.full(*unet_args, *lora)
        out = module.shallow(*unet_args, feature.detach(), *lora)
        grads = torch.autograd.grad(out.sum(), lora, allow_unused=True)
    return [g is not None for g in grads]


class _ShallowSubset(torch.nn.Module):
    """``shallow`` taking only the LoRA inputs it reads; the others are fixed zero tensors
    (nothing reads them: the exporter leaves them out of the graph)."""

    def __init__(self, owner: DeepCacheUNet, used: Sequence[bool], fill: Sequence[torch.Tensor]):
        super().__init__()
        self.owner = owner
        self.used = list(used)
        object.__setattr__(self, "fill", [torch.zeros_like(t) for t in fill])

    def forward(self, sample, timestep, hidden, deep_feature, *used_lora: torch.Tensor) -> torch.Tensor:
        it = iter(used_lora)
        lora = [next(it) if u else f for u, f in zip(self.used, self.fill)]
        return self.owner.shallow(sample, timestep, hidden, deep_feature, *lora)


def _check_feature_side(module: DeepCacheUNet, example: dict) -> None:
    """The deep feature must have the latent's side (its dims say ``h, w``)."""
    args = [torch.from_numpy(v) for v in example.values()]
    with torch.no_grad():
        _, feature = module.full(*args)
    side = example["sample"].shape[-2:]
    if tuple(feature.shape[-2:]) != tuple(side) or feature.shape[1] != module.feature_channels:
        raise InvalidInputError("unet", f"deep feature {list(feature.shape)} is not [N, {module.feature_channels}, "
                                        f"{side[0]}, {side[1]}]: unsupported up-block layout")


def _check_graph_inputs(path: Path, specs: Sequence[TensorSpec]) -> None:
    """The written graph's inputs are ``specs``, in order (the exporter drops inputs nothing reads)."""
    import onnx

    names = [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]
    if names != [s.name for s in specs]:
        missing = [s.name for s in specs if s.name not in names]
        raise RuntimeError(f"{path.parent.name}: graph inputs differ from io.json (missing {missing[:8]})")


def _infos(module: DeepCacheUNet, names: tuple[str, str], info: dict, unused: list[str]) -> tuple[dict, dict]:
    """io.json extras of the full and the shallow graph."""
    common = {"fp16_weights": module.compute_dtype == torch.float16, **info}
    cache = {"feature": DEEP_FEATURE, "feature_dims": list(feature_spec(module.feature_channels).dims),
             "split": SPLIT_NOTE, "schedule": "full at step i when i % cache_interval == 0, else shallow"}
    full = {**common, "model": names[0], "notes": f"DeepCache full step: noise_pred and {DEEP_FEATURE}, the "
            f"hidden state entering up_blocks[-1]; pair of {names[1]}",
            "deep_cache": {**cache, "role": "full", "pair": names[1]}}
    notes = f"DeepCache shallow step: noise_pred from the shallow part and a {DEEP_FEATURE} cached by {names[0]}"
    if unused:
        notes += f"; leaves out the {len(unused)} LoRA inputs of the deep part's layers (deep_cache.unused_inputs)"
    shallow = {**common, "model": names[1], "notes": notes,
               "deep_cache": {**cache, "role": "shallow", "pair": names[0], "unused_inputs": unused}}
    return full, shallow


def _export_pair(module: DeepCacheUNet, unet_io, names: tuple[str, str], out_dir, *, dims: ModelDims, batch: int,
                 opset: int, external_threshold: int, info: dict, extra_files: dict | None = None,
                 rank: int = 4) -> tuple[Path, Path]:
    """Trace ``full`` and ``shallow`` of ``module`` into ``<out_dir>/<names[0]>`` and ``<names[1]>``
    (the shallow graph with the LoRA inputs it reads only). The full graph is written first: its folder is
    replaced whole, so ``names[1]`` may lie inside it (the served layout, ``unet/shallow``)."""
    (full_in, full_out), (shallow_in, shallow_out) = deep_cache_io(*unet_io, module.feature_channels)
    full_ex = example_inputs(full_in, dims, batch=batch, rank=rank)
    _check_feature_side(module, full_ex)
    shallow_graph, unused = module.shallow_graph, []
    if len(full_in) > 3:
        used = used_lora_inputs(module, full_in, dims)
        unused = [s.name for s, u in zip(full_in[3:], used) if not u]
        shallow_graph = _ShallowSubset(module, used, [torch.from_numpy(full_ex[s.name]) for s in full_in[3:]])
        shallow_in = [s for s in shallow_in if s.name not in set(unused)]
    full_info, shallow_info = _infos(module, names, info, unused)
    out = Path(out_dir)
    full = export_graph(module.full_graph, full_in, full_out, full_ex, out / names[0], opset=opset, info=full_info,
                        external_threshold=external_threshold, extra_files=extra_files)
    shallow = export_graph(shallow_graph, shallow_in, shallow_out, example_inputs(shallow_in, dims, batch=batch,
                           rank=rank), out / names[1], opset=opset, info=shallow_info,
                           external_threshold=external_threshold, extra_files=extra_files)
    _check_graph_inputs(full, full_in)
    _check_graph_inputs(shallow, shallow_in)
    return full, shallow


def export_deep_cache_unet(unet: torch.nn.Module, out_dir: str | os.PathLike, *, dims: ModelDims, fp16: bool = False,
                           opset: int = DEFAULT_OPSET, batch: int = 2,
                           external_threshold: int = EXTERNAL_DATA_THRESHOLD) -> tuple[Path, Path]:
    """Write ``<out_dir>/unet_deep/`` and ``<out_dir>/unet_shallow/`` (model.onnx + io.json each);
    returns the two model.onnx paths. Inputs/outputs: the ``unet`` contract plus ``deep_feature``."""
    module = DeepCacheUNet(copy.deepcopy(unet).half() if fp16 else unet)
    return _export_pair(module, model_io("unet", dims), PLAIN_UNET_FOLDERS, out_dir, dims=dims, batch=batch,
                        opset=opset, external_threshold=external_threshold, info={})


def export_runtime_lora_deep_cache_unet(unet: torch.nn.Module, out_dir: str | os.PathLike, *, dims: ModelDims,
                                        rank: int = 16, fp16: bool = False, opset: int = DEFAULT_OPSET, batch: int = 2,
                                        external_threshold: int = EXTERNAL_DATA_THRESHOLD,
                                        name: str = UNET.name) -> tuple[Path, Path]:
    """Write the served ``unet``: ``<out_dir>/unet/`` and ``<out_dir>/unet/shallow/`` (model.onnx, io.json,
    lora_manifest.json each): the ``unet_lora`` contract plus ``deep_feature``. Returns the two model.onnx paths.
    ``name``: another served runtime-LoRA UNet of the same contract (``unet_fewstep``: ``<out_dir>/unet_fewstep/``
    and ``<out_dir>/unet_fewstep/shallow/``)."""
    if not isinstance(rank, int) or rank < 1:
        raise InvalidInputError("--runtime-lora-rank", f"must be an integer >= 1, got {rank!r}")
    if name not in RUNTIME_LORA_UNETS:
        raise ValueError(f"name: expected one of {', '.join(RUNTIME_LORA_UNETS)}, got {name!r}")
    folders = (name, f"{name}/{SHALLOW_FOLDER}")
    manifest = build_manifest(unet, rank)
    with adapted(RuntimeLoraUNet, unet, fp16) as lora_unet:  # the caller's UNet, adapted and put back: no copy
        return _export_pair(DeepCacheUNet(lora_unet), runtime_lora_io(dims, manifest), folders, out_dir,
                            dims=dims, batch=batch, opset=opset, external_threshold=external_threshold,
                            info={"lora_rank": rank}, extra_files={MANIFEST_FILE: manifest}, rank=rank)
