"""Read LoRA files for the merge and runtime-LoRA steps.

Two on-disk formats are accepted, both as safetensors:

* **diffusers / peft** — what ``StableDiffusionPipeline.save_lora_weights``
  writes (``unet.<module>.lora.down.weight``, ``text_encoder.<module>.
  lora_linear_layer.up.weight``, ``<module>.lora_A.weight`` …), with the peft
  config in the ``lora_adapter_metadata`` header (``lora_alpha``,
  ``alpha_pattern``, ``use_rslora``). Without that header the scale is 1
  (alpha = rank), as diffusers does.
* **kohya** (``lora_unet_down_blocks_0_..._to_q.lora_down.weight`` +
  ``.lora_up.weight`` + ``.alpha``): renamed with diffusers' own
  ``StableDiffusionPipeline.lora_state_dict``; the per-module ``alpha`` is kept
  (scale = alpha / rank).

Every layer ends up as a :class:`LoraLayer` keyed by (component, module
path), e.g. ``("unet", "down_blocks.0.attentions.0.transformer_blocks.0.
attn1.to_q")``, so the merge and the runtime-LoRA inputs read one shape of
data whatever the file looked like.

The server reads LoRA files without torch, with the numpy reader of
:mod:`facetron.diffusion.lora_inputs`, which accepts only facetron's canonical
layout (what ``facetron train`` writes); the LoRA rules (alpha, scale,
unsupported adapters) are that module's, so both readers agree.
:func:`convert_lora_file` rewrites any file this module reads in that layout.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors.torch import save as save_safetensors

from facetron.atomic import atomic_write_bytes
from facetron.diffusion.lora_reader import (COMPONENTS, KOHYA_PREFIXES, METADATA_KEY, LoraArrays, check_pair,
                                            component_metadata, few, layer_alpha, open_safetensors,
                                            read_adapter_metadata, reject_unsupported)
from facetron.errors import InvalidInputError

_A_SUFFIX = ".lora_A.weight"
_B_SUFFIX = ".lora_B.weight"


@dataclass(frozen=True)
class LoraLayer(LoraArrays):
    """One adapted layer as torch tensors: ``delta W = scale * B @ A`` (reshaped to the weight).

    Fields, ``rank`` and ``scale`` (peft's alpha / r, alpha / sqrt(r) for
    rsLoRA) are those of the numpy reader's :class:`LoraArrays`."""

    down: torch.Tensor  # A: [r, in] (linear) or [r, in, kh, kw] (conv)
    up: torch.Tensor  # B: [out, r] or [out, r, 1, 1]

    @property
    def in_features(self) -> int:
        return int(self.down.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    @property
    def delta_shape(self) -> tuple[int, ...]:
        return (self.out_features, *self.down.shape[1:])

    def delta(self) -> torch.Tensor:
        """``scale * B @ A`` in float32, shaped like the adapted layer's weight."""
        d = self.up.float().flatten(1) @ self.down.float().flatten(1)
        return (self.scale * d).reshape(self.delta_shape)


@dataclass
class LoraFile:
    """All layers of one LoRA file."""

    source: str  # the path (or a label for in-memory state dicts)
    format: str  # "diffusers" | "peft" | "kohya"
    layers: dict[tuple[str, str], LoraLayer] = field(default_factory=dict)
    sha256: str | None = None

    def component(self, name: str) -> dict[str, LoraLayer]:
        return {m: layer for (c, m), layer in self.layers.items() if c == name}

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(c for c in COMPONENTS if any(k[0] == c for k in self.layers))

    def describe(self) -> dict:
        """Small JSON-able summary (for provenance files and reports)."""
        ranks = sorted({layer.rank for layer in self.layers.values()})
        return {"path": self.source, "format": self.format, "sha256": self.sha256,
                "layers": {c: len(self.component(c)) for c in self.components}, "ranks": ranks}


# ----------------------------------------------------------------------------- reading


def load_lora(path: str | Path) -> LoraFile:
    """Read and normalise a LoRA ``.safetensors`` file (diffusers, peft or kohya keys)."""
    path = Path(path)
    with open_safetensors(path, "pt") as fh:
        metadata = dict(fh.metadata() or {})
        state = {k: fh.get_tensor(k) for k in fh.keys()}
    lora = parse_lora_state_dict(state, metadata, source=str(path))
    lora.sha256 = _sha256(path)
    return lora


def parse_lora_state_dict(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                          source: str = "<state dict>") -> LoraFile:
    """Normalise an in-memory LoRA state dict (see :func:`load_lora`)."""
    label = f"LoRA file {source}"
    state = dict(state)
    if not state:
        raise InvalidInputError(label, "holds no tensors")
    reject_unsupported(state, label)
    if all(k.startswith(KOHYA_PREFIXES) for k in state):
        fmt = "kohya"
        state, network_alphas = _convert_kohya(state, label)
        adapter_meta: dict = {}
    else:
        fmt = "diffusers" if any(k.startswith(tuple(f"{c}." for c in COMPONENTS)) for k in state) else "peft"
        network_alphas = {}
        adapter_meta = read_adapter_metadata(metadata, label)
        if fmt == "peft":  # bare peft keys (get_peft_model_state_dict of a UNet): no component prefix
            state = {f"unet.{k}": v for k, v in state.items()}
            adapter_meta = {(k if k.startswith("unet.") else f"unet.{k}"): v for k, v in adapter_meta.items()}

    lora = LoraFile(source=source, format=fmt)
    leftover = set(state)
    for comp in COMPONENTS:
        prefix = f"{comp}."
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        leftover -= {prefix + k for k in sub}
        if sub:
            for layer in _component_layers(comp, sub, network_alphas, adapter_meta, label):
                lora.layers[(comp, layer.module)] = layer
    if leftover:
        raise InvalidInputError(label, f"{len(leftover)} keys belong to no SD-1.5 component (unet, text_encoder), "
                                       f"e.g. {few(leftover)}")
    return lora


def _convert_kohya(state: dict, label: str) -> tuple[dict, dict]:
    """kohya keys -> diffusers keys with diffusers' own converter; returns (state, alphas)."""
    from diffusers import StableDiffusionPipeline

    if any(k.startswith("lora_te2_") for k in state):
        raise InvalidInputError(label, "has lora_te2_ keys (SDXL's second text encoder): not an SD-1.5 LoRA")
    try:
        converted, alphas = StableDiffusionPipeline.lora_state_dict(dict(state))
    except ValueError as exc:
        raise InvalidInputError(label, f"kohya keys could not be converted: {str(exc).strip()[:300]}") from None
    return converted, dict(alphas or {})


def _to_peft_names(comp: str, keys: Iterable[str]) -> dict[str, str]:
    """Map each key to peft's ``<module>.lora_A.weight`` form with diffusers' renaming tables.

    The tables only rename keys, so they run on ``{key: key}`` to learn
    new -> old names. The text-encoder table is chosen explicitly: diffusers'
    inference needs a ``to_out_lora`` key and fails for q-only LoRAs."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from diffusers.utils.state_dict_utils import StateDictType, convert_state_dict_to_peft

    identity = {k: k for k in keys}
    if comp == "unet":
        renamed = convert_unet_state_dict_to_peft(identity)
    else:
        renamed = convert_state_dict_to_peft(identity, original_type=StateDictType.DIFFUSERS_OLD)
    return {k.replace(".lora.down.weight", _A_SUFFIX).replace(".lora.up.weight", _B_SUFFIX): v
            for k, v in renamed.items()}


def _component_layers(comp: str, sub: dict, network_alphas: dict, adapter_meta: dict, label: str) -> list[LoraLayer]:
    new_to_old = _to_peft_names(comp, sub)
    pairs: dict[str, dict[str, str]] = {}
    odd = []
    for new, old in new_to_old.items():
        for suffix, kind in ((_A_SUFFIX, "A"), (_B_SUFFIX, "B")):
            if new.endswith(suffix):
                pairs.setdefault(new[: -len(suffix)], {})[kind] = old
                break
        else:
            odd.append(f"{comp}.{old}")
    if odd:
        raise InvalidInputError(label, f"{len(odd)} keys are neither LoRA down (A) nor up (B) weights, e.g. {few(odd)}")

    meta = component_metadata(adapter_meta, comp)
    rslora = bool(meta.get("use_rslora", False))
    layers = []
    for module, kinds in pairs.items():
        if set(kinds) != {"A", "B"}:
            missing = "up (B)" if "B" not in kinds else "down (A)"
            raise InvalidInputError(label, f"layer {comp}.{module} has no {missing} weight")
        down, up = sub[kinds["A"]], sub[kinds["B"]]
        check_pair(down.shape, up.shape, f"{comp}.{module}", label)
        if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
            raise InvalidInputError(label, f"layer {comp}.{module} holds NaN or inf values")
        # kohya: per-module alpha, keyed by diffusers' converter as "<down key>.alpha" for attention processors
        # and "<module>.alpha" for every other layer (resnets, proj_in/out, feed-forwards, samplers)
        alpha_keys = (f"{comp}.{kinds['A']}.alpha", f"{comp}.{kinds['A'].removesuffix('.lora.down.weight')}.alpha")
        alpha_key = next((k for k in alpha_keys if k in network_alphas), None)
        if alpha_key is not None:
            alpha = float(network_alphas[alpha_key])
        else:  # alpha_pattern / lora_alpha; without metadata scale 1 (alpha = rank), as diffusers does
            alpha = layer_alpha(meta, module, int(down.shape[0]))
        layers.append(LoraLayer(comp, module, down, up, alpha, rslora))
    return layers


# ----------------------------------------------------------------------------- matching a base


# transformers 5's CLIPTextModel has no ``text_model.`` level; kohya and older files name it.
_WRAPPER_PREFIXES = ("text_model.",)


def align_to(lora: LoraFile, components: Mapping[str, torch.nn.Module | None]) -> LoraFile:
    """Copy of ``lora`` whose module paths are those of ``components`` where they
    differ only by a wrapper prefix (``text_model.``); other names are kept."""
    layers = {}
    for comp in lora.components:
        model = components.get(comp)
        names = {n for n, _ in model.named_modules()} if model is not None else set()
        for module, layer in lora.component(comp).items():
            if module not in names:
                for prefix in _WRAPPER_PREFIXES:
                    if module.startswith(prefix) and module[len(prefix):] in names:
                        module = module[len(prefix):]
                        break
                    if prefix + module in names:
                        module = prefix + module
                        break
            layers[(comp, module)] = replace(layer, module=module)
    return LoraFile(source=lora.source, format=lora.format, layers=layers, sha256=lora.sha256)


def check_lora_matches(lora: LoraFile, components: Mapping[str, torch.nn.Module | None]) -> LoraFile:
    """Raise if ``lora`` was not made for these modules (``{"unet": ..., "text_encoder": ...}``).

    Names up to three layers that match nothing, or the first layer (in the
    network's order) whose shape differs, with both shapes. Returns the LoRA
    with its module paths aligned to ``components`` (see :func:`align_to`)."""
    label = f"LoRA file {lora.source}"
    lora = align_to(lora, components)
    for comp in lora.components:
        layers = lora.component(comp)
        model = components.get(comp)
        if model is None:
            raise InvalidInputError(label, f"adapts the {comp}, which is not part of this merge")
        modules = dict(model.named_modules())
        unmatched = [m for m in layers if m not in modules]
        if unmatched:
            raise InvalidInputError(
                label, f"{len(unmatched)} of {len(layers)} {comp} layers match no layer of the base model's {comp}, "
                       f"e.g. {few(unmatched)} (a LoRA for another architecture?)")
        for name, module in modules.items():  # network order: report the first mismatch
            layer = layers.get(name)
            if layer is None:
                continue
            weight = getattr(module, "weight", None)
            if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or weight is None:
                raise InvalidInputError(label, f"layer {comp}.{name} is a {type(module).__name__}; "
                                               "only Linear and Conv2d layers can take a LoRA here")
            if tuple(weight.shape) != layer.delta_shape:
                raise InvalidInputError(
                    label, f"shape mismatch at {comp}.{name}: the LoRA gives {layer.delta_shape}, the base model's "
                           f"weight is {tuple(weight.shape)} (a LoRA for a different base model?)")
    return lora


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- writing the canonical layout


def write_canonical_lora(lora: LoraFile, path: str | os.PathLike) -> Path:
    """Write ``lora`` in facetron's canonical layout (float32), atomically.

    Keys ``<component>.<module>.lora_A.weight`` / ``.lora_B.weight``; each
    layer's alpha and rank are kept in the ``lora_adapter_metadata`` header
    (``lora_alpha``/``r`` plus ``alpha_pattern``/``rank_pattern`` for the
    layers that differ), so :func:`facetron.diffusion.lora_reader.read_lora`
    and :func:`load_lora` give the same layers and scales as ``lora``."""
    state, meta = {}, {}
    for comp in lora.components:
        layers = lora.component(comp)
        for module, layer in layers.items():
            state[f"{comp}.{module}{_A_SUFFIX}"] = layer.down.float().contiguous()
            state[f"{comp}.{module}{_B_SUFFIX}"] = layer.up.float().contiguous()
        meta.update({f"{comp}.{k}": v for k, v in _adapter_config(layers).items()})
    data = save_safetensors(state, metadata={METADATA_KEY: json.dumps(meta), "format": "pt"})
    return atomic_write_bytes(path, data)


def convert_lora_file(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Read any LoRA file :func:`load_lora` accepts (kohya, old diffusers, peft) and write it canonically."""
    return write_canonical_lora(load_lora(src), dst)


def _adapter_config(layers: Mapping[str, LoraLayer]) -> dict:
    """peft config entries for one component: the common rank/alpha, patterns (exact names) for the rest."""
    rank = Counter(layer.rank for layer in layers.values()).most_common(1)[0][0]
    alpha = Counter(layer.alpha for layer in layers.values()).most_common(1)[0][0]
    exact = {module: "^" + re.escape(module) for module in layers}
    return {"r": rank, "lora_alpha": alpha, "use_rslora": any(layer.rslora for layer in layers.values()),
            "rank_pattern": {exact[m]: layer.rank for m, layer in layers.items() if layer.rank != rank},
            "alpha_pattern": {exact[m]: layer.alpha for m, layer in layers.items() if layer.alpha != alpha},
            "target_modules": sorted(layers)}
