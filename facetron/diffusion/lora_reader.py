"""LoRA files in numpy: facetron's canonical LoRA layout and the LoRA rules.

* :func:`read_lora`, a numpy reader for facetron's **canonical LoRA layout**
  — what ``facetron train`` writes through diffusers'
  ``StableDiffusionPipeline.save_lora_weights`` (see :data:`CANONICAL_SUFFIXES`)
  with peft's adapter config in the ``lora_adapter_metadata`` header. Other
  layouts (kohya, old diffusers attention processors, peft model keys) are
  refused with a one-line error saying how to convert them; the torch
  reader :func:`facetron.export.lora_files.load_lora` reads them all;
* the LoRA rules the torch reader shares (:func:`open_safetensors`,
  :func:`lora_scale`, :func:`layer_alpha`, :func:`read_adapter_metadata`,
  :func:`reject_unsupported`, :func:`check_weight`), so both readers give the
  same numbers and the same errors.

No torch, diffusers or peft: the served models import it
(:mod:`facetron.diffusion.lora_inputs` turns what it reads into graph inputs).
"""

from __future__ import annotations

import json
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Protocol, Sequence

import numpy as np
from safetensors import safe_open

from facetron.errors import InvalidInputError, NotFoundError

METADATA_KEY = "lora_adapter_metadata"
COMPONENTS = ("unet", "text_encoder")
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
# (down/A suffix, up/B suffix) per component, as save_lora_weights writes peft layers: diffusers renames
# the UNet's to_q/to_k/to_v/to_out.0 to ``.lora.down`` and the text encoder's q/k/v/out_proj to
# ``.lora_linear_layer.down``; any other adapted module keeps peft's ``.lora_A``.
CANONICAL_SUFFIXES: dict[str, tuple[tuple[str, str], ...]] = {
    "unet": ((".lora.down.weight", ".lora.up.weight"), (".lora_A.weight", ".lora_B.weight")),
    "text_encoder": ((".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
                     (".lora_A.weight", ".lora_B.weight")),
}
CONVERT_HINT = ("convert it once with facetron.export.lora_files.convert_lora_file(src, dst) (torch; reads kohya, "
                "old diffusers and peft files), or use merged mode")


# ----------------------------------------------------------------------------- LoRA rules (shared with export)


def check_weight(name: str, value: float) -> float:
    """``value`` as a finite float, else InvalidInputError naming ``name``."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InvalidInputError(name, f"must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise InvalidInputError(name, f"must be finite, got {value!r}")
    return value


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """peft's ``scaling``: alpha / r (alpha / sqrt(r) for rsLoRA)."""
    return alpha / (math.sqrt(rank) if rslora else rank)


def few(names: Iterable[str], n: int = 3) -> str:
    """The first ``n`` of ``names`` (sorted) for an error message, with how many more there are."""
    names = sorted(names)
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def reject_unsupported(keys: Iterable[str], label: str) -> None:
    """Raise for adapter kinds that are not a plain ``B @ A`` LoRA (DoRA, LoKr/LoHa, LoRA bias)."""
    keys = list(keys)
    checks = {
        "DoRA (dora_scale / lora_magnitude_vector)": ("dora_scale", "lora_magnitude_vector"),
        "LoKr/LoHa (lokr_/hada_)": (".lokr_", ".hada_", "lokr_w", "hada_w"),
        "LoRA bias (lora_B.bias)": ("lora_B.bias", "lora.up.bias", "lora_up.bias"),
    }
    for what, needles in checks.items():
        hits = [k for k in keys if any(n in k for n in needles)]
        if hits:
            raise InvalidInputError(label, f"{what} layers are not supported, e.g. {few(hits)}")


def read_adapter_metadata(metadata: Mapping[str, str] | None, label: str) -> dict:
    """The peft config JSON under the ``lora_adapter_metadata`` header ({} when absent)."""
    raw = (metadata or {}).get(METADATA_KEY)
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(label, f"header '{METADATA_KEY}' is not JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise InvalidInputError(label, f"header '{METADATA_KEY}' is not a JSON object")
    return meta


def component_metadata(adapter_meta: Mapping[str, Any], comp: str) -> dict:
    """The ``<comp>.``-prefixed entries of the adapter metadata, prefix removed."""
    return {k[len(comp) + 1:]: v for k, v in adapter_meta.items() if k.startswith(f"{comp}.")}


def layer_alpha(meta: Mapping[str, Any], module: str, rank: int) -> float:
    """A layer's alpha: ``alpha_pattern`` match, else ``lora_alpha``; ``rank`` (scale 1) without metadata."""
    if not meta:  # no alpha anywhere: diffusers/peft convention is scale 1
        return float(rank)
    return float(_pattern_value(meta.get("alpha_pattern") or {}, module, meta.get("lora_alpha", rank)))


def _pattern_value(patterns: Mapping[str, object], module: str, default: object) -> object:
    """peft's alpha_pattern lookup: a key matches a module name or its dotted tail."""
    for key, value in patterns.items():
        pat = key[1:] if key.startswith("^") else rf"(.*\.)?{key}"
        if re.fullmatch(pat, module):
            return value
    return default


def check_pair(down_shape: Sequence[int], up_shape: Sequence[int], name: str, label: str) -> None:
    """Raise unless down [r, in(, kh, kw)] and up [out, r(, 1, 1)] form one LoRA layer."""
    down_shape, up_shape = tuple(down_shape), tuple(up_shape)
    if len(down_shape) not in (2, 4) or len(up_shape) != len(down_shape) or up_shape[1] != down_shape[0] \
            or (len(up_shape) == 4 and up_shape[2:] != (1, 1)):
        raise InvalidInputError(label, f"layer {name}: down {down_shape} and up {up_shape} do not form a LoRA pair")


# ----------------------------------------------------------------------------- the numpy reader


@dataclass(frozen=True)
class LoraArrays:
    """One adapted layer: ``delta W = scale * B @ A``; float32 numpy arrays from :func:`read_lora`.

    export's torch reader extends it (``facetron.export.lora_files.LoraLayer``,
    the same fields holding tensors), so both share ``rank`` and ``scale``."""

    component: str  # "unet" | "text_encoder"
    module: str  # module path inside that component (peft's name)
    down: np.ndarray  # A: [r, in] (linear) or [r, in, kh, kw] (conv)
    up: np.ndarray  # B: [out, r] or [out, r, 1, 1]
    alpha: float
    rslora: bool = False

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """peft's ``scaling`` (see :func:`lora_scale`)."""
        return lora_scale(self.alpha, self.rank, self.rslora)


@dataclass
class LoraFileArrays:
    """All layers of one canonical LoRA file, keyed by (component, module)."""

    source: str
    layers: dict[tuple[str, str], LoraArrays] = field(default_factory=dict)


class LoraLayerLike(Protocol):
    """What :func:`lora_inputs_for` reads of a layer (:class:`LoraArrays`, or export's torch ``LoraLayer``)."""

    down: Any  # array-like; objects with ``.numpy()`` (tensors) are converted through it
    up: Any

    @property
    def rank(self) -> int: ...

    @property
    def scale(self) -> float: ...


class LoraLike(Protocol):
    """A loaded LoRA: ``source`` (for messages) and ``layers`` keyed by (component, module)."""

    source: str
    layers: Mapping[tuple[str, str], LoraLayerLike]


@contextmanager
def open_safetensors(path: str | os.PathLike, framework: str) -> Iterator[Any]:
    """``safe_open`` a LoRA file (``framework`` "np" or "pt"), for both readers: no file is a
    NotFoundError, and whatever fails while the block reads it is an InvalidInputError naming the file."""
    label = f"LoRA file {Path(path)}"
    if not Path(path).is_file():
        raise NotFoundError(f"{label}: no such file")
    try:
        with safe_open(str(path), framework=framework) as fh:
            yield fh
    except Exception as exc:  # safetensors raises several types for corrupt headers/bodies
        raise InvalidInputError(label, f"not a readable safetensors file ({type(exc).__name__}: {exc})") from None


def read_lora(path: str | os.PathLike) -> LoraFileArrays:
    """Read a LoRA ``.safetensors`` file in facetron's canonical layout into float32 arrays."""
    path = Path(path)
    with open_safetensors(path, "np") as fh:
        metadata = dict(fh.metadata() or {})
        keys = list(fh.keys())
        dtypes = {k: fh.get_slice(k).get_dtype() for k in keys}
        state = {k: fh.get_tensor(k) for k in keys if dtypes[k] != "BF16"}
    state.update({k: _read_bf16(path, k) for k in keys if dtypes[k] == "BF16"})
    return parse_lora_arrays({k: state[k] for k in keys}, metadata, source=str(path))


def parse_lora_arrays(state: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None,
                      source: str = "<state dict>") -> LoraFileArrays:
    """Check and pair the tensors of a canonical-layout LoRA state dict (see :func:`read_lora`)."""
    label = f"LoRA file {source}"
    if not state:
        raise InvalidInputError(label, "holds no tensors")
    reject_unsupported(state, label)
    adapter_meta = read_adapter_metadata(metadata, label)
    pairs = _canonical_pairs(state, label)
    lora = LoraFileArrays(source=source)
    for (comp, module), (down_key, up_key) in pairs.items():
        meta = component_metadata(adapter_meta, comp)
        down, up = (np.asarray(state[k], dtype=np.float32) for k in (down_key, up_key))
        check_pair(down.shape, up.shape, f"{comp}.{module}", label)
        if not (np.isfinite(down).all() and np.isfinite(up).all()):
            raise InvalidInputError(label, f"layer {comp}.{module} holds NaN or inf values")
        alpha = layer_alpha(meta, module, int(down.shape[0]))
        lora.layers[(comp, module)] = LoraArrays(comp, module, down, up, alpha, bool(meta.get("use_rslora", False)))
    return lora


def _canonical_pairs(keys: Iterable[str], label: str) -> dict[tuple[str, str], tuple[str, str]]:
    """(component, module) -> (down key, up key); raises for keys outside the canonical layout."""
    found: dict[tuple[str, str], dict[str, str]] = {}
    foreign = []
    for key in keys:
        hit = _split_key(key)
        if hit is None:
            foreign.append(key)
            continue
        comp, module, kind = hit
        found.setdefault((comp, module), {})[kind] = key
    if foreign:
        raise InvalidInputError(label, f"is not in facetron's canonical LoRA layout (keys as 'facetron train' "
                                       f"writes them: unet.<module>.lora.down.weight / .lora_A.weight): it has "
                                       f"{_layout_of(foreign)}, e.g. {few(foreign)}; {CONVERT_HINT}")
    pairs = {}
    for (comp, module), kinds in found.items():
        if set(kinds) != {"A", "B"}:
            missing = "up (B)" if "B" not in kinds else "down (A)"
            raise InvalidInputError(label, f"layer {comp}.{module} has no {missing} weight")
        pairs[(comp, module)] = (kinds["A"], kinds["B"])
    return pairs


def _split_key(key: str) -> tuple[str, str, str] | None:
    """``unet.<module>.lora.down.weight`` -> ("unet", module, "A"); None outside the canonical layout."""
    for comp, suffixes in CANONICAL_SUFFIXES.items():
        if not key.startswith(comp + "."):
            continue
        for down, up in suffixes:
            for suffix, kind in ((down, "A"), (up, "B")):
                module = key[len(comp) + 1: -len(suffix)] if key.endswith(suffix) else ""
                if module:
                    return comp, module, kind
    return None


_FOREIGN_LAYOUTS = (
    ("kohya keys (lora_unet_... / lora_te_...)", lambda k: k.startswith(KOHYA_PREFIXES)),
    ("peft model keys (base_model.model....)", lambda k: k.startswith("base_model.model.")),
    ("old diffusers attention-processor keys (..._lora.down.weight)", lambda k: "_lora.down." in k or "_lora.up." in k),
    ("keys without a unet. / text_encoder. prefix", lambda k: not k.startswith(tuple(f"{c}." for c in COMPONENTS))),
)


def _layout_of(keys: Sequence[str]) -> str:
    """What the non-canonical keys look like, for the error message."""
    for what, test in _FOREIGN_LAYOUTS:
        if any(test(k) for k in keys):
            return what
    return f"{len(keys)} keys that are neither LoRA down (A) nor up (B) weights"


def _read_bf16(path: Path, key: str) -> np.ndarray:
    """A bfloat16 tensor as float32 (exact: bf16 is the top half of an fp32); numpy has no bf16 type."""
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        entry = json.loads(fh.read(size))[key]
        start, end = entry["data_offsets"]
        fh.seek(8 + size + start)
        raw = np.frombuffer(fh.read(end - start), dtype="<u2")
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(entry["shape"])
