"""Runtime-LoRA UNet: one ONNX graph for every user, the LoRA given as inputs.

Each attention projection (``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of
every ``attn1``/``attn2``) computes

    y = W x + (x A_g[n]) B_i[n]

Projections that read the same tensor form a **group** ``g`` and share one
down-projection input ``lora_a_<g>  FP32[N, in, k·R]`` (the k members'
down-projections side by side, in the order of their ``slot``): self-
attention's q/k/v, cross-attention's k/v; q of cross-attention and every
``to_out.0`` are groups of one. The graph computes ``x @ A_g`` once per group
(one matmul instead of k). ``lora_b_<i>  FP32[N, k·R, out]`` is layer ``i``'s
up-projection, already transposed and carrying the LoRA's ``w · alpha / r``
(a user's strength and the base model, weight 0, are both folded in on the
host), in the ``R`` rows of its slot and zero in the others: each projection
is one MatMul and one Add on top of the base layer — no slices, transposes,
reshapes or scale multiplies run per call (layout 2 took each slot with a
slice and reshaped A per call: ~1000 more graph nodes at the tiny model,
3 % slower in ONNX Runtime).

``R`` is symbolic (the dims say ``R``, ``2R``, ``3R``): the host sends the
smallest rank bucket that holds the user's LoRA ranks
(:func:`facetron.diffusion.lora_inputs.rank_bucket`), up to the export rank,
so a rank-4 face LoRA costs rank-4 work. Zero padding of smaller ranks is
exact, as is concatenating a face and a style LoRA along ``R``. Every input
carries the batch dimension, so Triton's dynamic batcher can put requests of
*different users* into one batch. ``lora_manifest.json`` maps groups and
layers to modules and shapes (``layout`` 3; input names are
lower_snake_case, as the repository contract wants).

The served text encoder is the same idea (:func:`export_runtime_lora_text_encoder`,
``<out>/text_encoder/``, its served name): every CLIP self-attention q/k/v/out projection (what
the trainer adapts; q/k/v one group); its manifest says ``"component":
"text_encoder"``, and each graph takes only its own component's layers of a
user's LoRA.

Folders: the text encoder is exported under its served name; this module's
UNet graph is ``<out>/unet_lora/`` (:data:`MODEL_NAME`), measured and
validated beside the plain ``unet`` of ``export onnx``, not served (the
served ``unet`` is the same graph with the step cache's ``deep_feature``
output, :mod:`facetron.export.step_cache_graphs`).

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

from facetron.contract import TEXT_ENCODER
from facetron.diffusion.lora_inputs import LAYOUT, MANIFEST_FILE, a_name, b_name
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


class _Group:
    """One down-projection input shared by the projections that read the same tensor.

    ``a`` is ``[N, in, k·R]``; :meth:`down` computes ``x @ A`` once for all k
    slots (each member's B is zero outside its slot's rows). A projection
    called with a different tensor than the group's first (an attention
    processor that does not share the input) gets its own product: correct
    either way."""

    def __init__(self, size: int):
        self.size = size
        self.a: torch.Tensor | None = None
        self._x: torch.Tensor | None = None
        self._t: torch.Tensor | None = None

    def set(self, a: torch.Tensor | None) -> None:
        self.a, self._x, self._t = a, None, None

    def down(self, x: torch.Tensor) -> torch.Tensor:
        if self.a is None:
            raise RuntimeError("runtime LoRA tensors were not set")
        if self._x is not x:
            self._x, self._t = x, torch.matmul(x, _as(self.a, x))  # [N,T,in] @ [N,in,k*R] -> [N,T,k*R]
        return self._t


def _as(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` in ``like``'s dtype (no cast node in the graph when they already agree)."""
    return t if t.dtype == like.dtype else t.to(like.dtype)


class _RuntimeLoraLinear(torch.nn.Module):
    """``base(x) + (x A_g) B`` with the group's A and this layer's slot-placed B set before each call."""

    def __init__(self, base: torch.nn.Linear, group: _Group):
        super().__init__()
        self.base = base
        self.group = group
        self.b: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.b is None:
            raise RuntimeError("runtime LoRA tensors were not set")
        return self.base(x) + torch.matmul(self.group.down(x), _as(self.b, x))  # [N,T,k*R] @ [N,k*R,out]


@contextlib.contextmanager
def adapted(cls: type[_Adapted], net: torch.nn.Module, fp16: bool = False) -> Iterator[_Adapted]:
    """``cls(net)`` for a ``with`` block without a second copy of the weights (3.4 GB for an SD-1.5
    UNet): ``net`` itself is adapted and put back as it was afterwards. ``fp16``: an fp16 copy of ``net``
    is adapted instead (the one copy made)."""
    module = cls(copy.deepcopy(net).half() if fp16 else net, copy_net=False)
    try:
        yield module
    finally:
        module.restore()


def rank_symbol(k: int) -> str:
    """The symbolic dim of a rank axis holding ``k`` slots of ``R``: ``R``, ``2R``, ``3R``."""
    return "R" if k == 1 else f"{k}R"


def lora_groups(names: Sequence[str]) -> list[list[str]]:
    """The adapted modules grouped by the tensor they read, in network order:
    per attention ``attn1``/``self_attn`` q/k/v one group, ``attn2``'s q one
    and k/v one, each out projection its own."""
    by_parent: dict[str, dict[str, str]] = {}
    for name in names:
        parent, proj = (name[: -len(".to_out.0")], "to_out.0") if name.endswith(".to_out.0") else name.rsplit(".", 1)
        by_parent.setdefault(parent, {})[proj] = name
    groups: list[list[str]] = []
    for parent, projs in by_parent.items():
        if ".attn2" in parent + ".":  # cross-attention: q reads the image tokens, k/v the text
            sets = [["to_q"], ["to_k", "to_v"], ["to_out.0"]]
        else:  # self-attention (UNet attn1, CLIP self_attn): q/k/v read one tensor
            sets = [["to_q", "to_k", "to_v"], ["q_proj", "k_proj", "v_proj"], ["to_out.0"], ["out_proj"]]
        placed = set()
        for members in sets:
            group = [projs[p] for p in members if p in projs]
            if group:
                groups.append(group)
                placed.update(group)
        groups += [[n] for n in projs.values() if n not in placed]
    return groups


class _Adapted(torch.nn.Module):
    """A copy of ``net`` whose ``targets`` are runtime-LoRA layers, grouped by :func:`lora_groups`;
    :meth:`bound` sets the graph's LoRA inputs for a ``with`` block. ``copy_net=False`` adapts ``net``
    itself (no second copy of its weights; ``net`` is then this module's for good)."""

    def __init__(self, net: torch.nn.Module, targets: list[str], attr: str, copy_net: bool = True):
        super().__init__()
        object.__setattr__(self, "_was_training", net.training)
        setattr(self, attr, (copy.deepcopy(net) if copy_net else net).eval())
        self._attr = attr
        inner = getattr(self, attr)
        self.compute_dtype = next(inner.parameters()).dtype
        self.modules_ = list(targets)
        groups, order, names = [], [], []
        for members in lora_groups(targets):
            group = _Group(len(members))
            groups.append(group)
            for name in members:
                wrapper = _RuntimeLoraLinear(inner.get_submodule(name), group)
                inner.set_submodule(name, wrapper)
                order.append(wrapper)
                names.append(name)
        object.__setattr__(self, "_groups", groups)  # plain lists: the layers are registered inside the net
        object.__setattr__(self, "_layers", order)
        object.__setattr__(self, "_names", names)
        self.input_count = len(groups) + len(order)

    def restore(self) -> torch.nn.Module:
        """Put the adapted net's own linear layers back (after ``copy_net=False``: the caller's net is
        as it was); this module is not usable afterwards. Returns the net."""
        inner = getattr(self, self._attr)
        for name, layer in zip(self._names, self._layers):
            inner.set_submodule(name, layer.base)
        object.__setattr__(self, "_layers", [])
        object.__setattr__(self, "_groups", [])
        return inner.train(self._was_training)

    @contextlib.contextmanager
    def bound(self, lora: Sequence[torch.Tensor]) -> Iterator[torch.nn.Module]:
        """The adapted net with the graph's LoRA inputs (per group: its A, then
        each member's B — the manifest's order) set for the ``with`` block (any
        forward of it, whole or in parts, uses them)."""
        if len(lora) != self.input_count:
            raise ValueError(f"expected {self.input_count} LoRA tensors, got {len(lora)}")
        it = iter(lora)
        layers = iter(self._layers)
        for group in self._groups:
            group.set(next(it))
            for _ in range(group.size):
                next(layers).b = next(it)
        try:
            yield getattr(self, self._attr)
        finally:
            for group in self._groups:
                group.set(None)
            for layer in self._layers:
                layer.b = None


class RuntimeLoraUNet(_Adapted):
    """The torch function the ``unet_lora`` graph computes (a copy of ``unet`` is adapted)."""

    def __init__(self, unet: torch.nn.Module, copy_net: bool = True):
        super().__init__(unet, [name for name, _ in runtime_lora_targets(unet)], "unet", copy_net)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *lora: torch.Tensor) -> torch.Tensor:
        dt = self.compute_dtype
        with self.bound(lora) as unet:
            out = unet(sample.to(dt), timestep, encoder_hidden_states.to(dt), return_dict=False)[0]
        return out.float()


def build_manifest(unet: torch.nn.Module, rank: int, component: str = "unet") -> dict:
    """Groups and layers of every runtime-LoRA input of ``component`` ("unet":
    the UNet's attention projections; "text_encoder": the CLIP text encoder's,
    :func:`text_encoder_lora_targets`)."""
    if component == "text_encoder":
        return _manifest(text_encoder_lora_targets(unet), rank, component)
    targets = runtime_lora_targets(unet)
    if not targets:
        raise InvalidInputError("unet", "has no attention to_q/to_k/to_v/to_out.0 layers to adapt")
    return _manifest(targets, rank, component)


def _manifest(targets: list[tuple[str, torch.nn.Linear]], rank: int, component: str) -> dict:
    if not targets:
        raise InvalidInputError(component, "has no attention q/k/v/out projections to adapt")
    linear = dict(targets)
    index = {name: i for i, (name, _) in enumerate(targets)}
    groups, layers = [], []
    for g, members in enumerate(lora_groups([name for name, _ in targets])):
        d_in = linear[members[0]].in_features
        k_r = rank_symbol(len(members))
        groups.append({"index": g, "a": a_name(g), "in_features": d_in, "layers": [index[m] for m in members],
                       "a_dims": ["N", d_in, k_r]})
        for slot, name in enumerate(members):
            lin = linear[name]
            layers.append({"index": index[name], "module": name, "in_features": lin.in_features,
                           "out_features": lin.out_features, "group": g, "slot": slot,
                           "b": b_name(index[name]), "b_dims": ["N", k_r, lin.out_features]})
    return {"component": component, "layout": LAYOUT, "rank": rank, "groups": groups,
            "layers": sorted(layers, key=lambda layer: layer["index"]),
            "formula": "y_i = W_i x + (x @ A_g[n]) @ B_i[n]; A_g [N,in,k*R] holds the k layers of group g side by "
                       "side (slot order), B_i [N,k*R,out] carries w * alpha / r in the R rows of layer i's slot, "
                       "zero in the others",
            "padding": "R is the rank bucket of the batch (<= rank); smaller ranks are zero-padded; face and style "
                       "LoRAs are concatenated along R"}


def lora_specs(manifest: Mapping) -> list[TensorSpec]:
    """The graph's LoRA inputs in order: per group its A, then each member layer's B."""
    layers = {layer["index"]: layer for layer in manifest["layers"]}
    specs = []
    for group in manifest["groups"]:
        specs.append(TensorSpec(group["a"], "FP32", tuple(group["a_dims"])))
        specs += [TensorSpec(layers[i]["b"], "FP32", tuple(layers[i]["b_dims"])) for i in group["layers"]]
    return specs


def runtime_lora_io(dims: ModelDims, manifest: Mapping) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of the graph: the UNet's, then the LoRA inputs (:func:`lora_specs`)."""
    inputs, outputs = model_io("unet", dims)
    return [*inputs, *lora_specs(manifest)], outputs


def export_runtime_lora_unet(unet: torch.nn.Module, out_dir: str | os.PathLike, *, dims: ModelDims, rank: int = 16,
                             fp16: bool = False, opset: int = DEFAULT_OPSET, batch: int = 2,
                             external_threshold: int = EXTERNAL_DATA_THRESHOLD) -> Path:
    """Write ``<out_dir>/unet_lora/{model.onnx, io.json, lora_manifest.json}``."""
    if not isinstance(rank, int) or rank < 1:
        raise InvalidInputError("--runtime-lora-rank", f"must be an integer >= 1, got {rank!r}")
    manifest = build_manifest(unet, rank)
    inputs, outputs = runtime_lora_io(dims, manifest)
    example = example_inputs(inputs, dims, batch=batch, rank=rank)
    info = {"model": MODEL_NAME, "fp16_weights": fp16, "lora_rank": rank,
            "notes": "runtime LoRA: see lora_manifest.json; timestep FP32 [N]"}
    with adapted(RuntimeLoraUNet, unet, fp16) as module:
        return export_graph(module, inputs, outputs, example, Path(out_dir) / MODEL_NAME, opset=opset, info=info,
                            external_threshold=external_threshold, extra_files={MANIFEST_FILE: manifest})


# ----------------------------------------------------------------------------- the text encoder's

TEXT_ENCODER_MODEL_NAME = TEXT_ENCODER.name  # the served name: this graph is the served text_encoder
#: the CLIP self-attention projections, what the trainer adapts (fc1/fc2 are not: a LoRA adapting them is refused)
TEXT_ENCODER_TARGET_SUFFIXES = TEXT_ENCODER_TARGET_MODULES


def text_encoder_lora_targets(text_encoder: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """The text encoder's adapted layers, in network order: self-attention q/k/v/out projections
    (module names as peft names them in a LoRA file's ``text_encoder.`` keys)."""
    return [(name, m) for name, m in text_encoder.named_modules()
            if isinstance(m, torch.nn.Linear) and ".self_attn." in name
            and name.rsplit(".", 1)[-1] in TEXT_ENCODER_TARGET_SUFFIXES]


class RuntimeLoraTextEncoder(_Adapted):
    """The torch function the runtime-LoRA ``text_encoder`` graph computes: the CLIP text
    encoder (a copy) with per-item LoRA inputs on its self-attention projections;
    ``input_ids`` cast to int64 inside, ``last_hidden_state`` as FP32 (as the plain graph)."""

    def __init__(self, text_encoder: torch.nn.Module, copy_net: bool = True):
        super().__init__(text_encoder, [name for name, _ in text_encoder_lora_targets(text_encoder)], "text_encoder",
                         copy_net)

    def forward(self, input_ids: torch.Tensor, *lora: torch.Tensor) -> torch.Tensor:
        with self.bound(lora) as text_encoder:
            out = text_encoder(input_ids.to(torch.int64), return_dict=False)[0]
        return out.float()


def runtime_lora_text_encoder_io(dims: ModelDims, manifest: Mapping) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of the text-encoder graph: ``input_ids``, then the LoRA inputs (:func:`lora_specs`)."""
    inputs, outputs = model_io("text_encoder", dims)
    return [*inputs, *lora_specs(manifest)], outputs


def export_runtime_lora_text_encoder(text_encoder: torch.nn.Module, out_dir: str | os.PathLike, *, dims: ModelDims,
                                     rank: int = 32, fp16: bool = False, opset: int = DEFAULT_OPSET, batch: int = 2,
                                     external_threshold: int = EXTERNAL_DATA_THRESHOLD) -> Path:
    """Write the served ``text_encoder``: ``<out_dir>/text_encoder/{model.onnx, io.json, lora_manifest.json}``."""
    if not isinstance(rank, int) or rank < 1:
        raise InvalidInputError("text-encoder LoRA rank", f"must be an integer >= 1, got {rank!r}")
    manifest = build_manifest(text_encoder, rank, component="text_encoder")
    if fp16:
        text_encoder = copy.deepcopy(text_encoder)
        if hasattr(text_encoder, "set_attn_implementation"):
            text_encoder.set_attn_implementation("eager")  # as export_model: causal SDPA mixes fp32 into fp16
        text_encoder = text_encoder.half()
    inputs, outputs = runtime_lora_text_encoder_io(dims, manifest)
    example = example_inputs(inputs, dims, batch=batch, rank=rank)
    info = {"model": TEXT_ENCODER_MODEL_NAME, "fp16_weights": fp16, "lora_rank": rank,
            "notes": "runtime LoRA text encoder: see lora_manifest.json; input_ids cast to int64 inside the graph"}
    with adapted(RuntimeLoraTextEncoder, text_encoder) as module:  # the fp16 copy, else the caller's, put back
        return export_graph(module, inputs, outputs, example, Path(out_dir) / TEXT_ENCODER_MODEL_NAME, opset=opset,
                            info=info, external_threshold=external_threshold, extra_files={MANIFEST_FILE: manifest})
