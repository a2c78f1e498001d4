"""The runtime-LoRA bank of the served ``unet`` model (facetron.serving.unet),
without a server: hits and misses, the byte bound, stacking reuse, and the
registry version as part of the key (a retrained user is served on the next
request, a deleted one is gone)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from facetron.diffusion.lora_inputs import lora_inputs_for
from facetron.errors import NotFoundError
from facetron.export.runtime_lora import build_manifest
from facetron.pipeline.lora_bank import LoraBank, style_lora
from facetron.training.random_lora import write_random_lora
from facetron.users import UserRegistry


@pytest.fixture(scope="module")
def unet():
    from facetron.diffusion.base_model import load_base_model

    return load_base_model().unet


@pytest.fixture(scope="module")
def manifest(unet) -> dict:
    return build_manifest(unet, rank=8)


def _user(reg: UserRegistry, unet, tmp: Path, user: str, seed: int) -> Path:
    reg.save_reference_embedding(user, np.ones((1, 128), np.float32))
    lora = write_random_lora(tmp / f"{user}-{seed}.safetensors", unet, rank=4, alpha=4, seed=seed, std=0.3)
    reg.install_lora(user, lora)
    return lora


def _bank(reg: UserRegistry, manifest: dict, max_bytes: int = 512 << 20) -> LoraBank:
    return LoraBank(manifest, reg, style_lora, w_face=0.9, max_bytes=max_bytes)


def test_hits_misses_and_the_inputs_are_the_users(tmp_path, unet, manifest) -> None:
    reg = UserRegistry(tmp_path / "users")
    lora = _user(reg, unet, tmp_path, "ann", 1)
    bank = _bank(reg, manifest)
    first = bank.get("ann")
    assert bank.get("ann") is first and (bank.loads, bank.hits) == (1, 1)
    want = lora_inputs_for(lora, manifest, 0.9)
    for name, value in first.items():
        np.testing.assert_array_equal(value, want[name])
    base = bank.get("")
    assert all(not v.any() for v in base.values())


def test_bound_in_bytes_evicts_the_least_recently_used(tmp_path, unet, manifest) -> None:
    reg = UserRegistry(tmp_path / "users")
    for i, user in enumerate(("a1", "a2", "a3")):
        _user(reg, unet, tmp_path, user, i + 1)
    one = sum(v.nbytes for v in _bank(reg, manifest).get("a1").values())
    bank = _bank(reg, manifest, max_bytes=2 * one)
    bank.get("a1"), bank.get("a2"), bank.get("a1"), bank.get("a3")  # a2 is the least recent
    assert bank.size_bytes <= 2 * one and bank.evictions == 1
    loads = bank.loads
    bank.get("a1")
    assert bank.loads == loads  # still cached
    bank.get("a2")
    assert bank.loads == loads + 1  # was evicted


def test_a_retrained_user_is_served_on_the_next_request_and_a_deleted_one_is_gone(tmp_path, unet, manifest) -> None:
    reg = UserRegistry(tmp_path / "users")
    _user(reg, unet, tmp_path, "bob", 1)
    bank = _bank(reg, manifest)
    old = bank.batch(bank.keys([("bob", ""), ("", "")]))
    assert bank.batch(bank.keys([("bob", ""), ("", "")])) is old  # the denoising loop's steps reuse the stack
    new_lora = write_random_lora(tmp_path / "bob-2.safetensors", unet, rank=4, alpha=4, seed=2, std=0.3)
    reg.install_lora("bob", new_lora)
    new = bank.batch(bank.keys([("bob", ""), ("", "")]))
    assert new is not old
    want = lora_inputs_for(new_lora, manifest, 0.9)
    name = next(k for k in want if k.startswith("lora_b_"))
    np.testing.assert_array_equal(new[name][0], want[name][0])
    assert bank.evictions == 1  # the old version's entry is dropped, not kept until LRU
    reg.delete("bob")
    with pytest.raises(NotFoundError, match="unknown user 'bob'"):
        bank.batch(bank.keys([("bob", "")]))


def test_a_user_without_a_lora_is_not_found(tmp_path, manifest) -> None:
    reg = UserRegistry(tmp_path / "users")
    reg.save_reference_embedding("cid", np.ones((1, 128), np.float32))
    with pytest.raises(NotFoundError, match="no trained LoRA for user 'cid'"):
        _bank(reg, manifest).get("cid")


def test_the_text_encoder_bank_is_the_same_class_over_its_manifest(tmp_path, unet) -> None:
    """The served text_encoder's bank: one LoraBank over the text encoder's manifest;
    a user's entry holds the text-encoder layers of their LoRA (at w_face), a user
    whose LoRA has none gets all-zero inputs (the exact base encoder); the registry
    version is in the key, as for the UNet."""
    from facetron.diffusion.base_model import load_base_model

    te = load_base_model().text_encoder
    te_manifest = build_manifest(te, rank=8, component="text_encoder")
    reg = UserRegistry(tmp_path / "users")
    reg.save_reference_embedding("tea", np.ones((1, 128), np.float32))
    with_te = write_random_lora(tmp_path / "tea.safetensors", unet, rank=4, alpha=4, seed=7, std=0.3,
                                text_encoder=te)
    reg.install_lora("tea", with_te)
    _user(reg, unet, tmp_path, "plain", 8)
    bank = LoraBank(te_manifest, reg, w_face=0.9)
    assert bank.component == "text_encoder" and _bank(reg, build_manifest(unet, rank=8)).component == "unet"
    stacked = bank.batch(bank.keys([("tea", ""), ("plain", ""), ("", "")]))
    want = lora_inputs_for(with_te, te_manifest, 0.9)
    for name, value in want.items():
        np.testing.assert_array_equal(stacked[name][0], value[0])
    assert any(stacked[k][0].any() for k in stacked if k.startswith("lora_b_"))
    for item in (1, 2):
        assert all(not stacked[k][item].any() for k in stacked)
    assert (bank.loads, bank.hits) == (3, 0)
    reg.install_lora("tea", write_random_lora(tmp_path / "tea2.safetensors", unet, rank=4, alpha=4, seed=9, std=0.3))
    retrained = bank.get("tea")  # retrained without a text-encoder LoRA: the base encoder on the next request
    assert all(not v.any() for v in retrained.values()) and bank.evictions == 1
