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
LoRA file(s) (read by :mod:`facetron.diffusion.lora_reader`) into those inputs without torch,
diffusers or peft:

* the tensor names (:func:`a_name`, :func:`b_name`, :data:`LAYOUT`, :func:`rank_bucket`) and
  :func:`read_lora_manifest`;
* :func:`lora_inputs_for`, :func:`zero_lora_inputs`, :func:`stack_lora_inputs`,
  :func:`random_lora_inputs` (benchmarks and runtime choice).

Padding a smaller rank with zeros and stacking a face and a style LoRA along
the rank axis, each LoRA's ``weight · scale`` folded into ``B``, are exact:
the graph's output equals the merged UNet's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from facetron.diffusion.lora_reader import COMPONENTS, LoraLike, check_weight, few, read_lora
from facetron.errors import InvalidInputError

MANIFEST_FILE = "lora_manifest.json"
#: the manifest layout this code reads and writes: 3 = grouped A [N,in,k·R], B [N,k·R,out] (its slot's rows;
#: the scale folded in); 2 was A [N,in,k,R], B [N,R,out] (a slice per projection in the graph)
LAYOUT = 3
#: the smallest rank the inputs are built at (rank buckets: MIN_RANK_BUCKET * 2^j, up to the export rank)
MIN_RANK_BUCKET = 4


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
        out[group["a"]] = np.broadcast_to(side, (batch, *side.shape)).copy()  # its own, writable memory
        for slot, i in enumerate(group["layers"]):
            up = np.zeros((k * r, b[i].shape[0]), np.float32)
            up[slot * r:(slot + 1) * r] = b[i][:, :r].T * np.float32(scale)  # [r, out] in its slot
            out[b_names[i]] = np.broadcast_to(up, (batch, *up.shape)).copy()  # its own, writable memory
    return out
