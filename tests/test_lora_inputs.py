"""The numpy LoRA reader (facetron.diffusion.lora_reader) and runtime-LoRA inputs (facetron.diffusion.lora_inputs)
(what the served ``unet`` model uses) against the torch reader of
facetron.export.lora_files: bit-identical arrays for facetron's own files,
no torch in the server's imports, one-line errors for other layouts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from safetensors.torch import save_file as save_torch_file

from facetron.diffusion.base_model import load_base_model
from facetron.diffusion.lora_inputs import (lora_inputs_for, lora_rank_of, rank_bucket, stack_lora_inputs,
                                            zero_lora_inputs)
from facetron.diffusion.lora_reader import METADATA_KEY, read_lora
from facetron.errors import InvalidInputError
from facetron.export.lora_files import convert_lora_file, load_lora
from facetron.export.runtime_lora import build_manifest
from facetron.training.random_lora import write_random_lora

RANK = 8
W_FACE, W_STYLE = 0.9, 0.25
SERVER_FORBIDDEN = ("torch", "diffusers", "peft", "facetron.export", "facetron.training")


@pytest.fixture(scope="module")
def base():
    return load_base_model()


@pytest.fixture(scope="module")
def setup(base, tmp_path_factory):
    d = tmp_path_factory.mktemp("lora_inputs")
    face = write_random_lora(d / "face.safetensors", base.unet, rank=4, alpha=8, seed=21, std=0.1)
    style = write_random_lora(d / "style.safetensors", base.unet, rank=2, alpha=1, seed=22, std=0.1,
                              target_modules=("to_q", "to_v"))
    manifest = build_manifest(base.unet, RANK)
    (d / "lora_manifest.json").write_text(json.dumps(manifest))
    return {"dir": d, "face": face, "style": style, "manifest": manifest}


def torch_reference(plan, manifest) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """The pre-numpy algorithm: LoRAs read with load_lora (torch), A and w·scale·B stacked along the rank."""
    rank = int(manifest["rank"])
    by_module = {layer["module"]: layer for layer in manifest["layers"]}
    a = {layer["index"]: np.zeros((rank, layer["in_features"]), np.float32) for layer in manifest["layers"]}
    b = {layer["index"]: np.zeros((layer["out_features"], rank), np.float32) for layer in manifest["layers"]}
    used = {i: 0 for i in a}
    for path, w in plan:
        for (_, module), layer in load_lora(path).layers.items():
            i = by_module[module]["index"]
            r0, r1 = used[i], used[i] + layer.rank
            a[i][r0:r1] = layer.down.float().numpy()
            b[i][:, r0:r1] = layer.up.float().numpy() * (w * layer.scale)
            used[i] = r1
    return a, b


def assert_identical(got: dict[str, np.ndarray], want: tuple[dict, dict], manifest, batch: int, scale: float,
                     r: int) -> None:
    """Every item of the batch holds the reference's A and B bit for bit in the graph's layout at rank ``r``:
    group A ``[in, k*r]`` = its layers' A rows transposed, side by side; B ``[k*r, out]`` = B transposed x scale
    in the r rows of the layer's slot, zero in the others."""
    a, b = want
    names = {g["a"] for g in manifest["groups"]} | {layer["b"] for layer in manifest["layers"]}
    assert set(got) == names
    for group in manifest["groups"]:
        k = len(group["layers"])
        ref = np.concatenate([a[i][:r].T for i in group["layers"]], axis=1)
        assert got[group["a"]].dtype == np.float32 and got[group["a"]].shape == (batch, *ref.shape)
        assert all(np.array_equal(item, ref) for item in got[group["a"]]), group["a"]
        for slot, i in enumerate(group["layers"]):
            name = manifest["layers"][i]["b"]
            ref = np.zeros((k * r, b[i].shape[0]), np.float32)
            ref[slot * r:(slot + 1) * r] = b[i][:, :r].T * np.float32(scale)
            assert got[name].dtype == np.float32 and got[name].shape == (batch, *ref.shape)
            assert all(np.array_equal(item, ref) for item in got[name]), name
    assert not any(x[r:].any() for x in a.values()) and not any(x[:, r:].any() for x in b.values())  # nothing cut


def test_numpy_inputs_equal_the_torch_path_bit_for_bit(setup):
    m = setup["manifest"]
    got = lora_inputs_for(setup["face"], m, W_FACE, extra=[(setup["style"], W_STYLE)], batch=2, scale=0.7)
    want = torch_reference([(setup["face"], W_FACE), (setup["style"], W_STYLE)], m)
    assert lora_rank_of(got, m) == rank_bucket(6, RANK) == 8  # face rank 4 + style rank 2 -> bucket 8
    assert_identical(got, want, m, batch=2, scale=0.7, r=8)
    assert got["lora_b_0"][0, :4].any() and got["lora_b_0"][0, 4:6].any()  # face and style B are non-zero
    assert not got["lora_a_0"][0, :, 8 + 4:16].any()  # to_k (slot 1 of 3): no style layer, rank 4..8 stays zero
    # a loaded (torch) LoraFile goes through the same code: duck-typed layers with .numpy()
    loaded = lora_inputs_for(load_lora(setup["face"]), m, W_FACE, extra=[(load_lora(setup["style"]), W_STYLE)],
                             batch=2, scale=0.7)
    assert_identical(loaded, want, m, batch=2, scale=0.7, r=8)


def test_reader_agrees_with_load_lora_on_metadata_rules_and_dtypes(setup, tmp_path):
    """alpha_pattern, use_rslora, fp16 and bf16 tensors: same layers, alphas and scales as the torch reader."""
    state = {k: torch.from_numpy(v) for k, v in load_file(str(setup["face"])).items()}
    keys = sorted(k for k in state if k.endswith("down.weight"))
    state[keys[0]] = state[keys[0]].half()
    state[keys[1]] = state[keys[1]].bfloat16()
    module = keys[2][len("unet."):-len(".lora.down.weight")]
    meta = {"unet.r": 4, "unet.lora_alpha": 8, "unet.use_rslora": True, "unet.alpha_pattern": {"^" + module: 3.0}}
    path = tmp_path / "rs.safetensors"
    save_torch_file(state, str(path), metadata={METADATA_KEY: json.dumps(meta)})
    arrays, tensors = read_lora(path), load_lora(path)
    assert set(arrays.layers) == set(tensors.layers)
    for key, layer in tensors.layers.items():
        mine = arrays.layers[key]
        assert (mine.rank, mine.alpha, mine.scale) == (layer.rank, layer.alpha, layer.scale), key
        assert np.array_equal(mine.down, layer.down.float().numpy()) and np.array_equal(mine.up, layer.up.float().numpy())
    assert arrays.layers[("unet", module)].alpha == 3.0 and arrays.layers[("unet", module)].scale == 3.0 / 2


def test_server_import_pulls_no_torch(setup):
    """What the served unet model does (import, read a user's file, build inputs) loads none of SERVER_FORBIDDEN."""
    code = (
        "import sys\n"
        "from facetron.diffusion.lora_inputs import lora_inputs_for, read_lora_manifest\n"
        f"m = read_lora_manifest({str(setup['dir'])!r})\n"
        f"x = lora_inputs_for({str(setup['face'])!r}, m, 0.9, extra=[({str(setup['style'])!r}, 0.25)])\n"
        f"bad = [n for n in sys.modules if n.startswith({SERVER_FORBIDDEN!r})]\n"
        "print(len(x), sorted(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split(None, 1)[1].strip() == "[]", out.stdout


def kohya_copy(path: Path, out: Path, alpha: float) -> Path:
    """The same LoRA with kohya keys (lora_unet_<module_with_underscores>.lora_down.weight + .alpha)."""
    k = {}
    for key, v in load_file(str(path)).items():
        module, kind = key[len("unet."):].rsplit(".lora.", 1)
        name = "lora_unet_" + module.replace(".", "_")
        k[f"{name}.lora_{kind.split('.')[0]}.weight"] = v
        k[f"{name}.alpha"] = np.array(alpha, np.float32)
    save_file(k, str(out))
    return out


def test_kohya_file_is_refused_with_a_conversion_hint(setup, tmp_path):
    kohya = kohya_copy(setup["face"], tmp_path / "kohya_face.safetensors", alpha=8.0)
    with pytest.raises(InvalidInputError, match=r"kohya_face\.safetensors.*not in facetron's canonical LoRA layout.*"
                                                 r"kohya keys.*convert_lora_file") as err:
        lora_inputs_for(kohya, setup["manifest"])
    assert err.value.input_name == f"LoRA file {kohya}"
    # the torch path reads it; converted once, the server reads it with the same numbers
    converted = convert_lora_file(kohya, tmp_path / "converted.safetensors")
    assert_identical(lora_inputs_for(converted, setup["manifest"], W_FACE),
                     torch_reference([(kohya, W_FACE)], setup["manifest"]), setup["manifest"], batch=1, scale=1.0, r=4)


@pytest.mark.parametrize("key, layout", [
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight", "old diffusers"),
    ("base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight", "peft model keys"),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight", "without a unet"),
])
def test_other_layouts_are_named(setup, tmp_path, key, layout):
    path = tmp_path / "other.safetensors"
    save_file({key: np.zeros((2, 32), np.float32)}, str(path))
    with pytest.raises(InvalidInputError, match=rf"other\.safetensors.*canonical.*{layout}"):
        read_lora(path)


def test_zero_and_stacked_inputs(setup):
    m = setup["manifest"]
    zero = zero_lora_inputs(m, batch=2)
    assert not any(v.any() for v in zero.values()) and lora_rank_of(zero, m) == 4
    user = lora_inputs_for(setup["face"], m, W_FACE, extra=[(setup["style"], W_STYLE)])
    mixed = stack_lora_inputs([user, zero_lora_inputs(m)], m)
    assert mixed["lora_b_0"].shape == (2, 3 * RANK, 32) and mixed["lora_a_0"].shape == (2, 32, 3 * RANK)
    assert np.array_equal(mixed["lora_b_0"][0], user["lora_b_0"][0]) and not mixed["lora_b_0"][1].any()
    with pytest.raises(InvalidInputError, match="weight: must be finite"):
        lora_inputs_for(setup["face"], m, float("nan"))
    with pytest.raises(InvalidInputError, match="batch: must be an integer >= 1"):
        lora_inputs_for(setup["face"], m, batch=0)
