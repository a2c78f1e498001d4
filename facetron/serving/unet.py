"""The ``unet`` model: the runtime-LoRA UNet (serving mode 2) and its LoRA bank.

Each batch item names its user (``user_id``; empty = base model) and style;
a bounded LRU bank turns (user_id, style) into the runtime-LoRA graph's
LoRA inputs once — the user's face LoRA at ``w_face`` plus the style's LoRA
from the style registry (:mod:`facetron.styles`) at the style's weight, else
``w_style`` — and keeps them, so a request for any user needs no model
reload and requests of different users share a batch. Memory is bounded in
bytes; the least recently used entries go first. Nothing here imports
torch: LoRA files are read with numpy (:mod:`facetron.diffusion.lora_inputs`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from facetron.contract import DEEP_FEATURE, DEFAULT_STYLE_WEIGHT, INT8_FOLDER, INT8_MODES, UnetParams
from facetron.diffusion.lora_inputs import (lora_inputs_for, manifest_component, read_lora_manifest,
                                            stack_lora_inputs, zero_lora_inputs)
from facetron.errors import InvalidInputError, NotFoundError
from facetron.serving import metrics
from facetron.serving.backend import decode_utf8, get_input, pb, read_params, version_dir
from facetron.serving.ort_net import check_feed, check_finite, run_batched, unet_feed
from facetron.serving.runtimes import open_runtime
from facetron.styles import StyleRegistry, styles_for
from facetron.users import UserRegistry, registry_at, validate_user_id


Key = tuple[str, str, str, str]  # (user_id, user version, style, style install id)


def no_style_lora(name: str) -> tuple[Path | None, float]:
    """A bank without style LoRAs (the text encoder's: style LoRAs adapt the UNet only, :mod:`facetron.styles`)."""
    return None, 0.0


class LoraBank:
    """Bounded LRU of per-(user, style) LoRA inputs of one runtime-LoRA graph.

    One class for both served LoRA graphs: the manifest says which
    ``component`` it feeds ("unet": face + style LoRA; "text_encoder": the
    face LoRA's text-encoder layers, no style), and each entry holds only that
    component's part of the user's LoRA (zeros, i.e. the exact base net, for a
    user whose LoRA has none)."""

    def __init__(
        self,
        manifest: dict,
        registry: UserRegistry,
        style_lora: Callable[[str], tuple[Path | None, float]] = no_style_lora,
        w_face: float = 0.9,
        max_bytes: int = 512 << 20,
        style_version: Callable[[str], str] = lambda name: "",
    ):
        self.manifest = manifest
        self.component = manifest_component(manifest)
        self.style_version = style_version
        self.registry = registry
        self.style_lora = style_lora
        self.w_face = w_face
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Key, dict[str, np.ndarray]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.loads = 0  # how many times a LoRA file was read (cache misses)
        self.hits = 0
        self.evictions = 0
        self._last_batch: tuple[tuple[Key, ...], dict[str, np.ndarray]] | None = None

    def _build(self, user_id: str, style: str) -> dict[str, np.ndarray]:
        """One item's inputs: the user's face LoRA at ``w_face`` and the style's
        LoRA at its weight, stacked along the rank axis (each ``w · scale``
        folded into B: exactly the merged UNet's ``W + w_face·ΔW_face +
        w_style·ΔW_style``, diffusers' ``set_adapters([face, style], [w_face, w_style])``)."""
        plan: list[tuple[Path, float]] = []
        if user_id:
            plan.append((self.registry.lora_path(validate_user_id(user_id)), self.w_face))
        style_path, w_style = self.style_lora(style) if style else (None, 0.0)
        if style_path is not None:
            plan.append((style_path, w_style))
        if not plan:
            return zero_lora_inputs(self.manifest)
        (first, weight), extra = plan[0], plan[1:]
        return lora_inputs_for(first, self.manifest, weight, extra=extra)

    def _key(self, user_id: str, style: str) -> Key:
        """(user, the user's served version, style, the style's install id): a
        retrained user or a reinstalled style has a new version, so the next
        request misses and reads the new LoRA."""
        style_id = self.style_version(style) if style else ""
        if not user_id:
            return "", "", style, style_id
        version = self.registry.version(validate_user_id(user_id))
        if version is None:
            raise NotFoundError(f"user_id: unknown user {user_id!r} (not registered in {self.registry.root})")
        return user_id, version, style, style_id

    def get(self, user_id: str, style: str = "") -> dict[str, np.ndarray]:
        """One item's tensors (batch axis of 1, at the LoRA's rank bucket) for ``user_id`` ('' = base model)
        and ``style``."""
        return self._get(self._key(user_id, style))

    def _get(self, key: Key) -> dict[str, np.ndarray]:
        user_id, version, style, style_id = key
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                metrics.current().lora_lookup(hit=True)
                return self._entries[key]
        entry = self._build(user_id, style)
        size = sum(v.nbytes for v in entry.values())
        with self._lock:
            self.loads += 1
            metrics.current().lora_lookup(hit=False)
            for stale in [k for k in self._entries if (k[0] == user_id and k[1] != version)
                          or (k[2] == style and k[3] != style_id)]:
                self._drop(stale)  # an older version of this user or style is never served again
            self._entries[key] = entry
            self._bytes += size
            while self._bytes > self.max_bytes and len(self._entries) > 1:
                self._drop(next(iter(self._entries)))
            metrics.current().lora_bank_size(self._bytes, len(self._entries))
        return entry

    def _drop(self, key: Key) -> None:
        old = self._entries.pop(key)
        self._bytes -= sum(v.nbytes for v in old.values())
        self.evictions += 1
        metrics.current().lora_evicted()

    def batch(self, keys: list[tuple[str, str]]) -> dict[str, np.ndarray]:
        """Stacked inputs for a batch whose item i belongs to keys[i] = (user, style).

        A denoising loop sends the same users every step: the last stacked
        batch is reused while the (user, version, style) keys repeat (at
        SD-1.5 shapes a stack is ~5 MB per item at rank 4, copied again on every
        step otherwise). Items at different rank buckets are zero-padded to the
        largest (exact)."""
        key = tuple(self._key(u, s) for u, s in keys)
        last = self._last_batch
        if last is not None and last[0] == key:
            return last[1]
        stacked = stack_lora_inputs([self._get(k) for k in key], self.manifest)
        self._last_batch = (key, stacked)
        return stacked

    @property
    def size_bytes(self) -> int:
        return self._bytes


def style_lora(name: str, styles: StyleRegistry | None = None,
               w_style: float = DEFAULT_STYLE_WEIGHT) -> tuple[Path | None, float]:
    """(style LoRA file or None, its weight) of style ``name`` in ``styles``
    (None = the default style registry); ``w_style`` is the weight of a style
    that gives none. An unknown style is InvalidInputError naming ``style``."""
    return (styles or styles_for()).lora(name, w_style)


def item_strings(request, name: str, n: int) -> list[str]:
    """A per-item BYTES input ([N,1]) as N strings; absent = N empty strings."""
    t = pb().get_input_tensor_by_name(request, name)
    if t is None:
        return [""] * n
    arr = t.as_numpy().reshape(-1)
    if arr.shape[0] != n:
        raise InvalidInputError(name, f"expected one value per batch item ({n}), got {arr.shape[0]}")
    return [decode_utf8(x, name) for x in arr]


#: feed entry (object array, one (user_id, style) per item) that carries the items' LoRA keys from
#: UnetModel._read to _run, so a dynamic batch stacks its LoRA tensors once, not once per request
LORA_KEYS = "__lora_keys__"
#: feed entry marking a request that asked for the deep_feature output (a full step of the step cache);
#: run_batched groups requests by their feed's names, so full, shallow and plain steps run as separate batches
WANTS_FEATURE = "__wants_deep_feature__"
#: the step cache's shallow graph, in the unet's version folder (its io.json lists the LoRA inputs it reads)
SHALLOW_FOLDER = "shallow"


def unet_graph(folder: Path, params: UnetParams) -> Path:
    """The graph the ``unet`` model runs: ``model.onnx``, or with ``int8`` on (OpenVINO) the int8 IR
    ``<folder>/int8/model.xml`` the assembler wrote (its ``quantization.json`` says how it was made and
    how far it deviates)."""
    check_int8(params.int8)
    if params.int8 == "off":
        return folder / "model.onnx"
    ir = folder / INT8_FOLDER / "model.xml"
    if params.runtime != "openvino" or not ir.is_file():
        raise InvalidInputError("parameter int8", f"{params.int8!r} needs runtime openvino and {ir} "
                                                  "(`export repository --int8`)")
    return ir


def check_int8(mode: str, name: str = "int8") -> str:
    if mode not in INT8_MODES:
        raise InvalidInputError(name, f"expected one of {', '.join(INT8_MODES)}, got {mode!r}")
    return mode


class UnetModel:
    def initialize(self, args):
        params = read_params(args, UnetParams)
        folder = version_dir(args)
        # ONNX Runtime or OpenVINO (params.runtime): the LoRA tensors are plain graph inputs in both; the bank
        # hands the same stacked arrays back while a batch's users repeat (every denoising step), and
        # reuse_inputs keeps them bound in the runtime instead of passing ~65 inputs again on every call
        self.session = open_runtime(unet_graph(folder, params), params.runtime, params.intra_op_threads or None,
                                    params.providers, reuse_inputs=True, precision=params.precision,
                                    fallback_path=folder / "model.onnx")
        # the step cache: the graph above also gives deep_feature; the shallow graph opens on first use
        self._shallow_path = folder / SHALLOW_FOLDER / "model.onnx"
        self._open_shallow = partial(open_runtime, self._shallow_path, params.runtime, params.intra_op_threads or None,
                                     params.providers, reuse_inputs=True, precision=params.precision)
        self._shallow = None
        self._shallow_inputs: frozenset[str] = frozenset()  # the LoRA inputs it reads: fewer than the full graph's
        self._shallow_lock = threading.Lock()
        registry = registry_at(params.users_dir)
        styles = styles_for(registry.root)
        self.bank = LoraBank(
            read_lora_manifest(folder),
            registry,
            partial(style_lora, styles=styles, w_style=params.w_style),
            w_face=params.w_face,
            max_bytes=int(params.lora_cache_mb * (1 << 20)),
            style_version=styles.version,
        )
        metrics.install(args["model_name"])

    def _read(self, request):
        """The UNet inputs + each item's (user, style) under :data:`LORA_KEYS`; the bank entries are
        built here (a bad user or style fails this request only), stacked once per batch in :meth:`_run`."""
        feed = check_feed(unet_feed(request), self.session)
        n = feed["sample"].shape[0]
        feature = get_input(request, DEEP_FEATURE, dtype=np.float32, ndim=4, required=False)
        if feature is not None:  # a shallow step on a cached feature
            if feature.shape[0] != n:
                raise InvalidInputError(DEEP_FEATURE, f"expected one feature per batch item ({n}), got {feature.shape[0]}")
            feed[DEEP_FEATURE] = check_finite(feature, DEEP_FEATURE)
            check_feed({DEEP_FEATURE: feature}, self.shallow())
        elif DEEP_FEATURE in request.requested_output_names():  # a full step that keeps its feature
            feed[WANTS_FEATURE] = np.ones(n, bool)
        users, styles = item_strings(request, "user_id", n), item_strings(request, "style", n)
        keys = np.empty(n, dtype=object)
        for i, key in enumerate(zip(users, styles)):
            keys[i] = key  # element-wise: numpy would read a list of pairs as an [n, 2] array
        for key in dict.fromkeys(keys):  # one bank lookup per distinct (user, style) of this request
            self.bank.get(*key)
        feed[LORA_KEYS] = keys
        return feed

    def shallow(self):
        """The step cache's shallow graph, opened on first use (a repository without one refuses the input)."""
        with self._shallow_lock:
            if self._shallow is None:
                if not self._shallow_path.is_file():
                    raise InvalidInputError(DEEP_FEATURE, "this unet has no step-cache shallow graph (re-assemble the "
                                                          "repository to serve cache_interval > 1)")
                self._shallow = self._open_shallow()
                self._shallow_inputs = frozenset(spec.name for spec in self._shallow.get_inputs())
            return self._shallow

    def _run(self, feed):
        feed = dict(feed)
        feed.update(self.bank.batch(list(feed.pop(LORA_KEYS))))  # same arrays while the batch's keys repeat
        if DEEP_FEATURE in feed:  # shallow step: the graph reads only some of the LoRA inputs
            shallow = self.shallow()
            return {"noise_pred": shallow.run(["noise_pred"], {k: v for k, v in feed.items()
                                                               if k in self._shallow_inputs})[0]}
        outputs = ["noise_pred", DEEP_FEATURE] if feed.pop(WANTS_FEATURE, None) is not None else ["noise_pred"]
        return dict(zip(outputs, self.session.run(outputs, feed)))

    def execute(self, requests):
        return run_batched(requests, self._read, self._run)

    def finalize(self):
        self.session = self.bank = None
        metrics.uninstall()
