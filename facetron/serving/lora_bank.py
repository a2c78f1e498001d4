"""A bounded LRU bank of users' runtime-LoRA tensors (serving mode 2).

The runtime-LoRA UNet takes each batch item's LoRA as inputs; this bank
turns (user_id, style) into those tensors once and keeps them, so a request
for any user needs no model reload and requests of different users share a
batch. Memory is bounded in bytes; the least recently used entries go first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import numpy as np

from facetron.errors import NotFoundError
from facetron.users import UserRegistry, validate_user_id

LORA_FILE = "lora.safetensors"


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

    def lora_path(self, user_id: str) -> Path:
        path = self.registry.user_dir(validate_user_id(user_id)) / LORA_FILE
        if not path.is_file():
            raise NotFoundError(f"user_id: no trained LoRA for user {user_id!r} ({LORA_FILE} missing in {self.registry.root})")
        return path

    def _build(self, user_id: str, style: str) -> dict[str, np.ndarray]:
        from facetron.export.runtime_lora import lora_inputs_for, zero_lora_inputs

        style_path, w_style = self.style_lora(style) if style else (None, 0.0)
        if not user_id:
            if style_path is None:
                return {k: v[0] for k, v in zero_lora_inputs(self.manifest).items()}
            return {k: v[0] for k, v in lora_inputs_for(style_path, self.manifest, w_style).items()}
        extra = [(style_path, w_style)] if style_path else []
        inputs = lora_inputs_for(self.lora_path(user_id), self.manifest, self.w_face, extra=extra)
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
