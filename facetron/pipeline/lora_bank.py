"""The runtime-LoRA bank: each (user, style)'s LoRA inputs of one
runtime-LoRA graph (the ``unet``'s or the ``text_encoder``'s), built once
and kept in a bounded LRU.

A bounded LRU bank turns (user_id, style) into the graph's LoRA inputs
once — the user's face LoRA at ``w_face`` plus the style's LoRA from the
style registry (:mod:`facetron.style_registry`) at the style's weight, else
``w_style`` — and keeps them, so a request for any user needs no model
reload and requests of different users share a batch. Memory is bounded in
bytes; the least recently used entries go first. Nothing here imports
torch: LoRA files are read with numpy (:mod:`facetron.diffusion.lora_inputs`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from facetron import metrics
from facetron.contract import DEFAULT_STYLE_WEIGHT, DEFAULT_W_FACE
from facetron.diffusion.lora_inputs import (
    lora_inputs_for,
    manifest_component,
    stack_lora_inputs,
    zero_lora_inputs,
)
from facetron.errors import NotFoundError
from facetron.style_registry import StyleRegistry, styles_for
from facetron.users import UserRegistry, validate_user_id

Key = tuple[str, str, str, str]  # (user_id, user version, style, style install id)


def no_style_lora(name: str) -> tuple[Path | None, float]:
    """A bank without style LoRAs (the text encoder's: style LoRAs adapt the UNet only, :mod:`facetron.style_registry`)."""
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
        w_face: float = DEFAULT_W_FACE,
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

    def _build(self, key: Key) -> dict[str, np.ndarray]:
        """One item's inputs: the user's face LoRA (at the key's version) at ``w_face``
        and the style's LoRA at its weight, stacked along the rank axis (each ``w · scale``
        folded into B: exactly the merged UNet's ``W + w_face·ΔW_face +
        w_style·ΔW_style``, diffusers' ``set_adapters([face, style], [w_face, w_style])``)."""
        user_id, version, style, _ = key
        plan: list[tuple[Path, float]] = []
        if user_id:
            plan.append((self.registry.at_version(user_id, version).lora_path(), self.w_face))
        style_path, w_style = self.style_lora(style) if style else (None, 0.0)
        if style_path is not None:
            plan.append((style_path, w_style))
        if not plan:
            return zero_lora_inputs(self.manifest)
        (first, weight), extra = plan[0], plan[1:]
        return lora_inputs_for(first, self.manifest, weight, extra=extra)

    def key(self, user_id: str, style: str = "", version: str = "") -> Key:
        """(user, version, style, the style's install id), resolved once per request
        item: ``version`` is the registry version the caller pinned for its whole
        request (empty = the user's current one, one lookup here). A retrained user
        or a reinstalled style has a new version, so the next request misses and
        reads the new LoRA."""
        style_id = self.style_version(style) if style else ""
        if not user_id:
            return "", "", style, style_id
        user_id = validate_user_id(user_id)
        if not version:
            version = self.registry.version(user_id) or ""
            if not version:
                raise NotFoundError(f"user_id: unknown user {user_id!r}")  # no server path in a served message
        return user_id, version, style, style_id

    def keys(self, items: Sequence[tuple[str, ...]]) -> tuple[Key, ...]:
        """:meth:`key` of each (user_id, style[, version]) item, resolved once per distinct item."""
        resolved = {item: self.key(*item) for item in dict.fromkeys(items)}
        return tuple(resolved[item] for item in items)

    def get(self, user_id: str, style: str = "", version: str = "") -> dict[str, np.ndarray]:
        """One item's tensors (batch axis of 1, at the LoRA's rank bucket) for ``user_id`` ('' = base model)
        and ``style``."""
        return self.entry(self.key(user_id, style, version))

    def entry(self, key: Key) -> dict[str, np.ndarray]:
        user_id, version, style, style_id = key
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                metrics.current().lora_lookup(hit=True)
                return self._entries[key]
        entry = self._build(key)
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

    def batch(self, keys: Sequence[Key]) -> dict[str, np.ndarray]:
        """Stacked inputs for a batch whose item i belongs to ``keys[i]`` (from :meth:`key`).

        A denoising loop sends the same users every step: the last stacked
        batch is reused while the keys repeat (at SD-1.5 shapes a stack is
        ~5 MB per item at rank 4, copied again on every step otherwise). Items
        at different rank buckets are zero-padded to the largest (exact)."""
        key = tuple(keys)
        last = self._last_batch
        if last is not None and last[0] == key:
            return last[1]
        stacked = stack_lora_inputs([self.entry(k) for k in key], self.manifest)
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
