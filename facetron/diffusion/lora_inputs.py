"""LoRA files -> the runtime-LoRA UNet's and text encoder's inputs, in numpy
(what the served ``unet`` and ``text_encoder`` models need).

Each manifest names its ``component`` ("unet" | "text_encoder"); a graph's
inputs hold that component's layers of a LoRA and ignore the other's (the
other graph takes them).

The runtime-LoRA graph (exported by :mod:`facetron.export.runtime_lora`)
adapts every attention projection as ``y_i = W_i x + (x A_g[n]) B_i[n]``:
projections reading one tensor share their group's A input ``[N, in, k·R]``
(the k members' down-projections side by side, slot-major), each has its B
``[N, k·R, out]``: its up-projection, with the LoRA's weight and ``alpha /
r`` folded in, in its slot's ``R`` rows and zero in the others (so the graph
needs no slicing: one MatMul and one Add per projection, one MatMul per
group); ``lora_manifest.json`` beside it maps groups and layers to modules
and shapes. ``R`` is symbolic: inputs are built at the
smallest rank bucket holding the LoRA (:func:`rank_bucket`), and a batch of
items with different buckets is zero-padded to the largest
(:func:`stack_lora_inputs`) — exact. This module holds everything that turns a user's
LoRA file(s) into those inputs without torch, diffusers or peft:

* the tensor names (:func:`a_name`, :func:`b_name`, :data:`LAYOUT`, :func:`rank_bucket`) and
  :func:`read_lora_manifest`;
* :func:`read_lora`, a numpy reader for facetron's **canonical LoRA layout**
  — what ``facetron train`` writes through diffusers'
  ``StableDiffusionPipeline.save_lora_weights`` (see :data:`CANONICAL_SUFFIXES`)
  with peft's adapter config in the ``lora_adapter_metadata`` header. Other
  layouts (kohya, old diffusers attention processors, peft model keys) are
  refused with a one-line error saying how to convert them; the torch
  reader :func:`facetron.export.lora_files.load_lora` reads them all;
* :func:`lora_inputs_for`, :func:`zero_lora_inputs`, :func:`stack_lora_inputs`,
  :func:`random_lora_inputs` (benchmarks and runtime choice);
* the LoRA rules the torch reader shares (:func:`lora_scale`,
  :func:`layer_alpha`, :func:`read_adapter_metadata`,
  :func:`reject_unsupported`, :func:`check_weight`), so both readers give the
  same numbers and the same errors.

Padding a smaller rank with zeros and stacking a face and a style LoRA along
the rank axis, each LoRA's ``weight · scale`` folded into ``B``, are exact:
the graph's output equals the merged UNet's.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, Sequence

import numpy as np
from safetensors import safe_open

from facetron.errors import InvalidInputError, NotFoundError

MANIFEST_FILE = "lora_manifest.json"
#: the manifest layout this code reads and writes: 3 = grouped A [N,in,k·R], B [N,k·R,out] (its slot's rows;
#: the scale folded in); 2 was A [N,in,k,R], B [N,R,out] (a slice per projection in the graph)
LAYOUT = 3
#: the smallest rank the inputs are built at (rank buckets: MIN_RANK_BUCKET * 2^j, up to the export rank)
MIN_RANK_BUCKET = 4
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


def a_name(g: int) -> str:
    """Graph input holding group ``g``'s A (down) matrices side by side, ``FP32[N, in, k·R]``."""
    return f"lora_a_{g}"


def b_name(i: int) -> str:
    """Graph input holding layer ``i``'s B (up) matrices (scale folded in) in its slot's rows, ``FP32[N, k·R, out]``."""
    return f"lora_b_{i}"


def rank_bucket(used: int, rank: int) -> int:
    """The ``R`` the inputs of a LoRA using ``used`` rank rows are built at: the
    smallest :data:`MIN_RANK_BUCKET` · 2^j that holds them, at most the
    export ``rank`` (few distinct shapes, so static-shape runtimes compile
    few graphs)."""
    r = MIN_RANK_BUCKET
    while r < used:
        r *= 2
    return min(r, int(rank))


def read_lora_manifest(model_dir: str | os.PathLike) -> dict:
    """``lora_manifest.json`` of an exported runtime-LoRA model folder."""
    path = Path(model_dir) / MANIFEST_FILE
    if not path.is_file():
        raise InvalidInputError(f"runtime-LoRA folder {Path(model_dir)}", f"has no {MANIFEST_FILE}")
    manifest = json.loads(path.read_text())
    if manifest.get("layout") != LAYOUT:
        raise InvalidInputError(f"runtime-LoRA folder {Path(model_dir)}",
                                f"has a layout-{manifest.get('layout', 1)} graph (this code feeds layout {LAYOUT}: "
                                "grouped A inputs [N,in,k*R], slot-placed B [N,k*R,out]): export it again")
    return manifest


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


def read_lora(path: str | os.PathLike) -> LoraFileArrays:
    """Read a LoRA ``.safetensors`` file in facetron's canonical layout into float32 arrays."""
    path = Path(path)
    label = f"LoRA file {path}"
    if not path.is_file():
        raise NotFoundError(f"{label}: no such file")
    try:
        with safe_open(str(path), framework="np") as fh:
            metadata = dict(fh.metadata() or {})
            keys = list(fh.keys())
            dtypes = {k: fh.get_slice(k).get_dtype() for k in keys}
            state = {k: fh.get_tensor(k) for k in keys if dtypes[k] != "BF16"}
    except Exception as exc:  # safetensors raises several types for corrupt headers/bodies
        raise InvalidInputError(label, f"not a readable safetensors file ({type(exc).__name__}: {exc})") from None
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


# ----------------------------------------------------------------------------- inputs for a user


def lora_inputs_for(lora: LoraLike | str | os.PathLike, manifest: Mapping, weight: float = 1.0, *,
                    extra: Iterable[tuple[LoraLike | str | os.PathLike, float]] = (), batch: int = 1,
                    scale: float = 1.0) -> dict[str, np.ndarray]:
    """Graph inputs (``lora_a_<g>``, ``lora_b_<i>``) for one user's LoRA, at its rank bucket.

    ``lora``: a path (read with :func:`read_lora`) or a loaded LoRA
    (:class:`LoraLike`, e.g. export's torch ``LoraFile``). ``weight`` is the
    LoRA's strength (w_face); ``extra`` adds more LoRAs, e.g.
    ``[(style, w_style)]``. Each LoRA's ``weight · scale`` is folded into B
    and the ranks are stacked, so the graph output equals the merged UNet's.
    Every array has leading batch dimension ``batch`` (the same user repeated;
    use :func:`stack_lora_inputs` to mix users in one batch). ``scale``
    multiplies every B (0 = the base model, exactly)."""
    plan = [(_loaded(lora), check_weight("weight", weight))]
    plan += [(_loaded(src), check_weight("weight", w)) for src, w in extra]
    rank = int(manifest["rank"])
    a, b = _zeros(manifest)
    used = {i: 0 for i in a}
    by_module = {layer["module"]: layer for layer in manifest["layers"]}
    for loaded, w in plan:
        _fill(loaded, w, by_module, rank, a, b, used, manifest_component(manifest))
    return _batched(a, b, manifest, batch, scale, rank_bucket(max(used.values(), default=0), rank))


#: what each component's runtime-LoRA graph is called in messages
COVERS = {"unet": "UNet", "text_encoder": "text encoder"}


def manifest_component(manifest: Mapping) -> str:
    """The component a runtime-LoRA manifest's graph adapts ("unet" for manifests written before the key existed)."""
    return str(manifest.get("component", "unet"))


def has_layers(lora: LoraLike | str | os.PathLike, component: str) -> bool:
    """Whether ``lora`` adapts any layer of ``component``."""
    return any(c == component for c, _ in _loaded(lora).layers)


def zero_lora_inputs(manifest: Mapping, batch: int = 1) -> dict[str, np.ndarray]:
    """All-zero LoRA inputs at the smallest rank bucket: the graph then computes the base net exactly."""
    a, b = _zeros(manifest)
    return _batched(a, b, manifest, batch, 1.0, rank_bucket(0, int(manifest["rank"])))


def random_lora_inputs(manifest: Mapping, batch: int = 1, seed: int = 0, rank: int | None = None,
                       std: float = 0.05) -> dict[str, np.ndarray]:
    """Seeded non-zero LoRA inputs at ``rank`` (default: the export rank), for
    benchmarks and the runtime choice (the served shapes and zero pattern of a full-rank user)."""
    rng = np.random.default_rng(seed)
    r = int(manifest["rank"]) if rank is None else int(rank)
    a = {layer["index"]: (rng.standard_normal((r, layer["in_features"])) * std).astype(np.float32)
         for layer in manifest["layers"]}
    b = {layer["index"]: (rng.standard_normal((layer["out_features"], r)) * std).astype(np.float32)
         for layer in manifest["layers"]}
    return _batched(a, b, manifest, batch, 1.0, r)


def _slots(manifest: Mapping) -> dict[str, int]:
    """Every LoRA input's ``k`` (its group's member count: the rank axis holds k slots of R)."""
    size = {group["index"]: len(group["layers"]) for group in manifest["groups"]}
    out = {group["a"]: size[group["index"]] for group in manifest["groups"]}
    out.update({layer["b"]: size[layer["group"]] for layer in manifest["layers"]})
    return out


def _rank_axis(name: str, ndim: int) -> int:
    return ndim - 1 if name.startswith("lora_a_") else ndim - 2


def lora_rank_of(inputs: Mapping[str, np.ndarray], manifest: Mapping) -> int:
    """The ``R`` of a set of LoRA inputs (every A's last axis and every B's second-last hold k·R)."""
    k = _slots(manifest)
    return max(int(v.shape[_rank_axis(n, v.ndim)]) // k[n] for n, v in inputs.items())


def pad_lora_rank(inputs: Mapping[str, np.ndarray], r: int, manifest: Mapping) -> dict[str, np.ndarray]:
    """``inputs`` zero-padded to rank ``r`` (each of an input's k slots grows to ``r``): the same function, exactly."""
    k_of, out = _slots(manifest), {}
    for name, v in inputs.items():
        axis, k = _rank_axis(name, v.ndim), k_of[name]
        r0 = v.shape[axis] // k
        if r0 > r:
            raise ValueError(f"{name}: rank {r0} is over {r}")
        if r0 < r:
            split = v.reshape(*v.shape[:axis], k, r0, *v.shape[axis + 1:])  # the slots apart
            width = [(0, 0)] * split.ndim
            width[axis + 1] = (0, r - r0)
            v = np.ascontiguousarray(np.pad(split, width).reshape(*v.shape[:axis], k * r, *v.shape[axis + 1:]))
        out[name] = v
    return out


def stack_lora_inputs(per_request: Sequence[Mapping[str, np.ndarray]], manifest: Mapping) -> dict[str, np.ndarray]:
    """Concatenate several requests' LoRA inputs along the batch axis (mixed-user batch), each
    zero-padded to the largest rank among them."""
    if not per_request:
        raise InvalidInputError("per_request", "needs at least one set of inputs")
    r = max(lora_rank_of(x, manifest) for x in per_request)
    padded = [pad_lora_rank(x, r, manifest) for x in per_request]
    return {k: np.concatenate([np.asarray(p[k]) for p in padded], axis=0) for k in padded[0]}


def _loaded(source: LoraLike | str | os.PathLike) -> LoraLike:
    return read_lora(source) if isinstance(source, (str, os.PathLike)) else source


def _zeros(manifest: Mapping) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Per layer index: A [R, in] and B [out, R], all zero."""
    rank = int(manifest["rank"])
    a = {layer["index"]: np.zeros((rank, layer["in_features"]), np.float32) for layer in manifest["layers"]}
    b = {layer["index"]: np.zeros((layer["out_features"], rank), np.float32) for layer in manifest["layers"]}
    return a, b


def _fill(lora: LoraLike, w: float, by_module: Mapping[str, Mapping], rank: int, a: dict, b: dict,
          used: dict[int, int], comp: str = "unet") -> None:
    """Write ``lora``'s A and ``w · scale · B`` into the next free rank rows/columns of every layer it adapts."""
    label = f"LoRA file {lora.source}"
    # the other component's layers are that component's graph's inputs (the served unet and text_encoder
    # each take their part of a user's LoRA); a layer of this component the graph has no inputs for is refused
    others = [f"{c}.{m}" for (c, m) in lora.layers if c not in COMPONENTS or (c == comp and m not in by_module)]
    if others:
        what = COVERS.get(comp, comp)
        raise InvalidInputError(label, f"adapts {len(others)} layers the runtime-LoRA {what} has no inputs for "
                                       f"(it covers the attention q/k/v/out projections), e.g. {few(others)}"
                                       + (": use merged mode" if comp == "unet" else ""))
    for (c, module), layer in lora.layers.items():
        if c != comp:
            continue
        spec = by_module[module]
        i = spec["index"]
        down, up = _float32(layer.down), _float32(layer.up)
        delta_shape = (up.shape[0], *down.shape[1:])
        if delta_shape != (spec["out_features"], spec["in_features"]):
            raise InvalidInputError(label, f"shape mismatch at {comp}.{module}: the LoRA gives {delta_shape}, "
                                           f"the graph expects {(spec['out_features'], spec['in_features'])}")
        r0, r1 = used[i], used[i] + layer.rank
        if r1 > rank:
            raise InvalidInputError(label, f"layer {comp}.{module} needs rank {r1} (all LoRAs together), "
                                           f"the graph was exported with rank {rank}")
        a[i][r0:r1] = down
        b[i][:, r0:r1] = up * (w * layer.scale)
        used[i] = r1


def _float32(x: Any) -> np.ndarray:
    """``x`` as a float32 array; tensors (objects with ``.numpy()``) are widened with ``.float()`` first."""
    if hasattr(x, "numpy"):
        x = x.float().numpy() if hasattr(x, "float") else x.numpy()
    return np.asarray(x, dtype=np.float32)


def _batched(a: dict, b: dict, manifest: Mapping, batch: int, scale: float, r: int) -> dict[str, np.ndarray]:
    """The graph's layout at rank ``r``: per group A ``[batch, in, k·r]`` (its layers' A rows, transposed,
    side by side in slot order), per layer B ``[batch, k·r, out]`` (transposed, times ``scale``, in the rows
    of its slot; zero elsewhere)."""
    if not isinstance(batch, int) or batch < 1:
        raise InvalidInputError("batch", f"must be an integer >= 1, got {batch!r}")
    b_names = {layer["index"]: layer["b"] for layer in manifest["layers"]}
    out = {}
    for group in manifest["groups"]:
        k = len(group["layers"])
        side = np.concatenate([a[i][:r].T for i in group["layers"]], axis=1)  # [in, k*r]
        out[group["a"]] = np.ascontiguousarray(np.broadcast_to(side, (batch, *side.shape)))
        for slot, i in enumerate(group["layers"]):
            up = np.zeros((k * r, b[i].shape[0]), np.float32)
            up[slot * r:(slot + 1) * r] = b[i][:, :r].T * np.float32(scale)  # [r, out] in its slot
            out[b_names[i]] = np.ascontiguousarray(np.broadcast_to(up, (batch, *up.shape)))
    return out
