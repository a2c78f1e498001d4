"""The embedded tiny default and base-model folder loading."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from facetron.diffusion.base_model import (
    build_models,
    check_layout,
    ensure_tiny_model,
    load_base_model,
    model_hash,
)
from facetron.diffusion.model_spec import TINY
from facetron.errors import InvalidInputError, NotFoundError


@pytest.fixture(scope="module")
def tiny_path() -> Path:
    return ensure_tiny_model()


def test_tiny_model_loads_and_says_it_is_a_smoke_model(tiny_path: Path) -> None:
    model = load_base_model(tiny_path)
    assert model.is_smoke_model and model.resolution == 128 and model.latent_factor == 8
    ids = model.tokenizer(["a photo of a man"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = model.text_encoder(ids)[0]
        noise = model.unet(torch.randn(1, 4, 16, 16), torch.tensor([10]), hidden).sample
    assert hidden.shape == (1, 77, 32) and noise.shape == (1, 4, 16, 16)


def test_tiny_model_is_reproducible(tiny_path: Path) -> None:
    unet, _, _ = build_models(TINY)
    loaded = load_base_model(tiny_path).unet.state_dict()
    for name, tensor in unet.state_dict().items():
        assert torch.equal(tensor, loaded[name]), name
    assert model_hash(tiny_path) == model_hash(tiny_path)


def test_missing_part_is_named(tiny_path: Path, tmp_path: Path) -> None:
    broken = tmp_path / "model"
    shutil.copytree(tiny_path, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(InvalidInputError, match=r"missing part 'vae/'"):
        check_layout(broken)
    with pytest.raises(NotFoundError, match="no such folder"):
        check_layout(tmp_path / "nothing")


def test_corrupt_part_is_named(tiny_path: Path, tmp_path: Path) -> None:
    broken = tmp_path / "model"
    shutil.copytree(tiny_path, broken)
    weights = next((broken / "unet").glob("*.safetensors"))
    weights.write_bytes(b"garbage")
    with pytest.raises(InvalidInputError, match=r"part 'unet/' failed to load"):
        load_base_model(broken)
