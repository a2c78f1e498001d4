"""The ``unet`` model: the runtime-LoRA UNet (serving mode 2) and its LoRA bank.

Each batch item names its user (``user_id``; empty = base model) and style;
a bounded LRU bank turns (user_id, style) into the runtime-LoRA graph's
LoRA inputs once and keeps them, so a request for any user needs no model
reload and requests of different users share a batch. Memory is bounded in
bytes; the least recently used entries go first. Nothing here imports
torch: LoRA files are read with numpy (:mod:`facetron.diffusion.lora_inputs`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable

import numpy as np

from facetron.contract import UnetParams
from facetron.diffusion.lora_inputs import lora_inputs_for, read_lora_manifest, zero_lora_inputs
from facetron.diffusion.styles import STYLES
from facetron.errors import InvalidInputError
from facetron.serving.backend import decode_utf8, pb, read_params, version_dir
from facetron.serving.ort_net import open_session, run_batched, unet_feed
from facetron.users import UserRegistry, registry_at, validate_user_id


class LoraBank:
    def __init__(
        self,
        manifest: dict,
        registry: UserRegistry,
        style_lora: Callable[[str], tuple[str | None, float]],
        w_face: float = 0.9,
        max_bytes: int = 512 << 20,
    ):
        self.manifest = manifest
        self.registry = registry
        self.style_lora = style_lora
        self.w_face = w_face
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, str], dict[str, np.ndarray]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.loads = 0  # how many times a LoRA file was read (cache misses)
        self._last_batch: tuple[tuple[tuple[str, str], ...], dict[str, np.ndarray]] | None = None

    def _build(self, user_id: str, style: str) -> dict[str, np.ndarray]:
        style_path, w_style = self.style_lora(style) if style else (None, 0.0)
        if not user_id:
            if style_path is None:
                return {k: v[0] for k, v in zero_lora_inputs(self.manifest).items()}
            return {k: v[0] for k, v in lora_inputs_for(style_path, self.manifest, w_style).items()}
        extra = [(style_path, w_style)] if style_path else []
        inputs = lora_inputs_for(self.registry.lora_path(validate_user_id(user_id)), self.manifest, self.w_face, extra=extra)
        return {k: v[0] for k, v in inputs.items()}

    def get(self, user_id: str, style: str = "") -> dict[str, np.ndarray]:
        """Per-item tensors (no batch axis) for ``user_id`` ('' = base model) and ``style``."""
        key = (user_id, style)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        entry = self._build(user_id, style)
        size = sum(v.nbytes for v in entry.values())
        with self._lock:
            self.loads += 1
            self._entries[key] = entry
            self._bytes += size
            while self._bytes > self.max_bytes and len(self._entries) > 1:
                _, old = self._entries.popitem(last=False)
                self._bytes -= sum(v.nbytes for v in old.values())
        return entry

    def batch(self, keys: list[tuple[str, str]]) -> dict[str, np.ndarray]:
        """Stacked inputs for a batch whose item i belongs to keys[i].

        A denoising loop sends the same users every step: the last stacked
        batch is reused while the keys repeat (at SD-1.5 shapes a stack is
        ~20 MB per item, copied again on every step otherwise)."""
        key = tuple(keys)
        last = self._last_batch
        if last is not None and last[0] == key:
            return last[1]
        entries = [self.get(u, s) for u, s in keys]
        stacked = {k: np.stack([e[k] for e in entries]) for k in entries[0]}
        self._last_batch = (key, stacked)
        return stacked

    @property
    def size_bytes(self) -> int:
        return self._bytes


def style_lora(name: str) -> tuple[str | None, float]:
    """(style LoRA path or None, its weight) of a known style."""
    style = STYLES.get(name)
    return (style.lora, style.lora_weight) if style and style.lora else (None, 0.0)


def item_strings(request, name: str, n: int) -> list[str]:
    """A per-item BYTES input ([N,1]) as N strings; absent = N empty strings."""
    t = pb().get_input_tensor_by_name(request, name)
    if t is None:
        return [""] * n
    arr = t.as_numpy().reshape(-1)
    if arr.shape[0] != n:
        raise InvalidInputError(name, f"expected one value per batch item ({n}), got {arr.shape[0]}")
    return [decode_utf8(x, name) for x in arr]


class UnetModel:
    def initialize(self, args):
        params = read_params(args, UnetParams)
        folder = version_dir(args)
        self.session = open_session(folder / "model.onnx", params.intra_op_threads or None, params.providers)
        self.bank = LoraBank(
            read_lora_manifest(folder),
            registry_at(params.users_dir),
            style_lora,
            w_face=params.w_face,
            max_bytes=int(params.lora_cache_mb * (1 << 20)),
        )

    def _read(self, request):
        feed = unet_feed(request)
        n = feed["sample"].shape[0]
        users, styles = item_strings(request, "user_id", n), item_strings(request, "style", n)
        feed.update(self.bank.batch(list(zip(users, styles))))
        return feed

    def _run(self, feed):
        return {"noise_pred": self.session.run(["noise_pred"], feed)[0]}

    def execute(self, requests):
        return run_batched(requests, self._read, self._run)

    def finalize(self):
        self.session = self.bank = None
