"""Runtime-LoRA UNet (one graph, LoRA as inputs) vs the merged-UNet ONNX and
the base-UNet ONNX, all run in ONNX Runtime on the tiny model.

Tolerance: runtime vs merged <= 1e-4 max abs (measured ~1e-6: fp32 order of
operations, (W + BA)x vs Wx + B(Ax)); zero LoRA vs base <= 1e-5."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from facetron.diffusion.base_model import load_base_model
from facetron.diffusion.lora_inputs import (LAYOUT, MANIFEST_FILE, lora_inputs_for, lora_rank_of, read_lora_manifest,
                                            stack_lora_inputs, zero_lora_inputs)
from facetron.errors import InvalidInputError
from facetron.export.lora_files import load_lora
from facetron.export.merge import merge_loras
from facetron.export.onnx_export import export_model
from facetron.export.onnx_graph import ModelDims
from facetron.export.runtime_lora import export_runtime_lora_unet
from facetron.training.random_lora import write_random_lora

RANK = 8
W_FACE, W_STYLE = 0.9, 0.25
MERGED_TOL = 1e-4
BASE_TOL = 1e-5


@pytest.fixture(scope="module")
def base():
    return load_base_model()


@pytest.fixture(scope="module")
def setup(base, tmp_path_factory):
    d = tmp_path_factory.mktemp("runtime_lora")
    face = write_random_lora(d / "face.safetensors", base.unet, rank=4, alpha=8, seed=11, std=0.1)
    style = write_random_lora(d / "style.safetensors", base.unet, rank=2, alpha=1, seed=12, std=0.1,
                              target_modules=("to_q", "to_v"))
    dims = ModelDims.of(base)
    runtime = export_runtime_lora_unet(base.unet, d / "rt", dims=dims, rank=RANK)
    plain = export_model("unet", d / "base", unet=base.unet, dims=dims)
    merged_unet, _ = merge_loras(base, face, style, w_face=W_FACE, w_style=W_STYLE)
    merged = export_model("unet", d / "merged", unet=merged_unet, dims=dims)
    face_only, _ = merge_loras(base, face, w_face=W_FACE)
    merged_face = export_model("unet", d / "merged_face", unet=face_only, dims=dims)
    return {"dir": d, "face": face, "style": style, "runtime": runtime, "base": plain, "merged": merged,
            "merged_face": merged_face, "manifest": read_lora_manifest(runtime.parent)}


def run(path: Path, feed: dict) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def unet_feed(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"sample": rng.standard_normal((batch, 4, 16, 16)).astype(np.float32),
            "timestep": rng.integers(1, 1000, batch).astype(np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, 77, 32)).astype(np.float32)}


def test_manifest_maps_groups_and_layers_to_modules(setup):
    m = setup["manifest"]
    assert m["rank"] == RANK and m["layout"] == LAYOUT and "scale_input" not in m
    assert len(m["layers"]) == 32
    first = m["layers"][0]
    assert first == {"index": 0, "module": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                     "in_features": 32, "out_features": 32, "group": 0, "slot": 0,
                     "b": "lora_b_0", "b_dims": ["N", "3R", 32]}
    # self-attention q/k/v read one tensor: one A for the three; cross-attention: q alone, k/v together
    modules = {layer["index"]: layer["module"].rsplit(".", 2)[-2:] for layer in m["layers"]}
    kinds = [tuple("/".join(modules[i]) for i in g["layers"]) for g in m["groups"]]
    assert kinds[:6] == [("attn1/to_q", "attn1/to_k", "attn1/to_v"), ("to_out/0",), ("attn2/to_q",),
                         ("attn2/to_k", "attn2/to_v"), ("to_out/0",), ("attn1/to_q", "attn1/to_k", "attn1/to_v")]
    assert m["groups"][0]["a_dims"] == ["N", 32, "3R"] and m["groups"][0]["a"] == "lora_a_0"
    assert m["groups"][1]["a_dims"] == ["N", 32, "R"] and m["layers"][3]["b_dims"] == ["N", "R", 32]
    assert sorted(i for g in m["groups"] for i in g["layers"]) == list(range(32))
    sess = ort.InferenceSession(str(setup["runtime"]), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    assert names[:5] == ["sample", "timestep", "encoder_hidden_states", "lora_a_0", "lora_b_0"]
    assert len(names) == 3 + len(m["groups"]) + 32 and all(re.fullmatch(r"[a-z0-9_]+", n) for n in names)
    mid_k = next(layer for layer in m["layers"] if layer["module"].endswith("mid_block.attentions.0.transformer_blocks.0.attn2.to_k"))
    assert (mid_k["in_features"], mid_k["out_features"]) == (32, 64)
    assert json.loads((setup["runtime"].parent / MANIFEST_FILE).read_text()) == m


def test_a_layout_1_graph_is_refused_by_name(setup, tmp_path):
    old = json.loads((setup["runtime"].parent / MANIFEST_FILE).read_text())
    old.pop("layout")
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(old))
    with pytest.raises(InvalidInputError, match=r"layout-1 graph.*export it again"):
        read_lora_manifest(tmp_path)


def test_runtime_lora_equals_merged_face_and_style(setup):
    feed = unet_feed(2)
    lora = lora_inputs_for(setup["face"], setup["manifest"], W_FACE, extra=[(setup["style"], W_STYLE)], batch=2)
    got = run(setup["runtime"], {**feed, **lora})
    want = run(setup["merged"], feed)
    diff = float(np.abs(got - want).max())
    print(f"runtime LoRA vs merged UNet (face+style), max abs diff: {diff:.3g}")
    assert diff <= MERGED_TOL
    assert float(np.abs(want - run(setup["base"], feed)).max()) > 100 * MERGED_TOL  # the LoRA matters


def test_zero_lora_equals_base(setup):
    feed = unet_feed(2, seed=1)
    got = run(setup["runtime"], {**feed, **zero_lora_inputs(setup["manifest"], batch=2)})
    assert float(np.abs(got - run(setup["base"], feed)).max()) <= BASE_TOL
    # scale = 0 (folded into B) switches a user's LoRA off as well
    off = lora_inputs_for(setup["face"], setup["manifest"], W_FACE, batch=2, scale=0.0)
    assert float(np.abs(run(setup["runtime"], {**feed, **off}) - run(setup["base"], feed)).max()) <= BASE_TOL


def test_mixed_user_batch(setup):
    """Two requests (face user, base user) in one batch give each its own result."""
    feed = unet_feed(2, seed=2)
    user = lora_inputs_for(load_lora(setup["face"]), setup["manifest"], W_FACE, batch=1)
    mixed = stack_lora_inputs([user, zero_lora_inputs(setup["manifest"], batch=1)], setup["manifest"])
    got = run(setup["runtime"], {**feed, **mixed})
    assert float(np.abs(got[:1] - run(setup["merged_face"], feed)[:1]).max()) <= MERGED_TOL
    assert float(np.abs(got[1:] - run(setup["base"], feed)[1:]).max()) <= BASE_TOL


def test_inputs_are_built_at_the_rank_bucket_and_padding_is_exact(setup):
    """A rank-4 face LoRA is sent at R = 4 (not the export rank 8); with the rank-2 style stacked on it, R = 8
    (bucket of 6); the product of a layer's A slot and B is the LoRA's delta."""
    m = setup["manifest"]
    inputs = lora_inputs_for(setup["face"], m, 1.0)
    a, b = inputs["lora_a_0"], inputs["lora_b_0"]  # q/k/v: 3 slots of R; to_q is slot 0
    assert a.shape == (1, 32, 3 * 4) and b.shape == (1, 3 * 4, 32) and lora_rank_of(inputs, m) == 4
    assert not b[0, 4:].any() and b[0, :4].any()  # to_q's B fills its slot's rows only
    both = lora_inputs_for(setup["face"], m, 1.0, extra=[(setup["style"], 1.0)])
    assert lora_rank_of(both, m) == RANK and not both["lora_a_0"][0, :, 6:RANK].any()
    layer = load_lora(setup["face"]).component("unet")[m["layers"][0]["module"]]
    np.testing.assert_allclose((a[0] @ b[0]).T, layer.delta().numpy(), rtol=1e-6, atol=1e-7)
    padded = stack_lora_inputs([inputs, both], m)  # mixed buckets: zero-padded to the largest, the same function
    assert lora_rank_of(padded, m) == RANK and not padded["lora_a_0"][0, :, 4:RANK].any()
    np.testing.assert_array_equal(padded["lora_a_0"][0, :, RANK:RANK + 4], a[0, :, 4:8])  # to_k's slot moved
    np.testing.assert_array_equal(padded["lora_b_0"][0, :4], b[0, :4])
    feed = unet_feed(1, seed=5)
    alone = run(setup["runtime"], {**feed, **inputs})
    in_batch = run(setup["runtime"], {**{k: np.concatenate([v, v]) for k, v in feed.items()}, **padded})
    assert float(np.abs(in_batch[:1] - alone).max()) <= BASE_TOL


def test_too_large_rank_is_named(setup, base, tmp_path):
    big = write_random_lora(tmp_path / "big.safetensors", base.unet, rank=RANK + 1, alpha=1, seed=3, std=0.1)
    with pytest.raises(InvalidInputError, match=r"big.safetensors.*needs rank 9.*exported with rank 8"):
        lora_inputs_for(big, setup["manifest"])


def test_layers_outside_attention_are_named(setup, base, tmp_path):
    conv = write_random_lora(tmp_path / "proj.safetensors", base.unet, rank=2, alpha=2, seed=5, std=0.1,
                             target_modules=("to_q", "proj_in"))
    with pytest.raises(InvalidInputError, match=r"proj_in"):
        lora_inputs_for(conv, setup["manifest"])


def test_validate_runtime_lora_graph(setup, base):
    from facetron.export.validate import validate_model

    entry = validate_model("unet_lora", setup["runtime"].parent, base)
    assert entry["pass"], entry


# ----------------------------------------------------------------------------- the runtime-LoRA text encoder
# Tolerance: runtime vs the fused (merge_loras) text encoder <= 1e-4 max abs (fp32 order of operations, as the
# UNet's); zero LoRA vs the plain text-encoder graph <= 1e-5.


@pytest.fixture(scope="module")
def te_setup(base, tmp_path_factory):
    from facetron.export.runtime_lora import export_runtime_lora_text_encoder

    d = tmp_path_factory.mktemp("runtime_lora_te")
    dims = ModelDims.of(base)
    face_te = write_random_lora(d / "face_te.safetensors", base.unet, rank=4, alpha=8, seed=21, std=0.1,
                                text_encoder=base.text_encoder, te_rank=4, te_alpha=4)
    runtime = export_runtime_lora_text_encoder(base.text_encoder, d / "rt", dims=dims, rank=RANK)
    plain = export_model("text_encoder", d / "base", text_encoder=base.text_encoder, dims=dims)
    _, merged_te = merge_loras(base, face_te, w_face=W_FACE)
    merged = export_model("text_encoder", d / "merged", text_encoder=merged_te, dims=dims)
    return {"face_te": face_te, "runtime": runtime, "base": plain, "merged": merged,
            "manifest": read_lora_manifest(runtime.parent)}


def te_ids(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, (batch, 77)).astype(np.int32)


def test_text_encoder_manifest_covers_self_attention(te_setup, base):
    m = te_setup["manifest"]
    assert m["component"] == "text_encoder" and m["rank"] == RANK
    modules = [layer["module"] for layer in m["layers"]]
    layers = base.text_encoder.config.num_hidden_layers
    assert len(modules) == 4 * layers and all(re.search(r"self_attn\.(q|k|v|out)_proj$", x) for x in modules)


def test_runtime_text_encoder_equals_fused_and_zero_equals_base(te_setup):
    ids = te_ids(2)
    m = te_setup["manifest"]
    got = run(te_setup["runtime"], {"input_ids": ids, **lora_inputs_for(te_setup["face_te"], m, W_FACE, batch=2)})
    want = run(te_setup["merged"], {"input_ids": ids})
    base_out = run(te_setup["base"], {"input_ids": ids})
    assert np.abs(got - want).max() <= MERGED_TOL
    assert np.abs(got - base_out).max() > 1e-2  # the LoRA changes the hidden states
    zero = run(te_setup["runtime"], {"input_ids": ids, **zero_lora_inputs(m, batch=2)})
    print(f"text encoder: runtime vs fused max abs {np.abs(got - want).max():.2g}, "
          f"zero LoRA vs base {np.abs(zero - base_out).max():.2g}, LoRA effect {np.abs(got - base_out).max():.2g}")
    assert np.abs(zero - base_out).max() <= BASE_TOL
    # mixed batch: item 0 the user's LoRA, item 1 the base encoder
    mixed = stack_lora_inputs([lora_inputs_for(te_setup["face_te"], m, W_FACE), zero_lora_inputs(m)], m)
    out = run(te_setup["runtime"], {"input_ids": ids, **mixed})
    assert np.abs(out[0] - want[0]).max() <= MERGED_TOL and np.abs(out[1] - base_out[1]).max() <= BASE_TOL


def test_each_graph_takes_its_components_layers(setup, te_setup, base, tmp_path):
    """A LoRA with UNet and text-encoder layers: the UNet's inputs equal those of its UNet part alone;
    a UNet-only LoRA gives the text encoder all-zero inputs (the exact base encoder)."""
    face_te = te_setup["face_te"]
    unet_only = write_random_lora(tmp_path / "u.safetensors", base.unet, rank=4, alpha=8, seed=21, std=0.1)
    both, alone = lora_inputs_for(face_te, setup["manifest"]), lora_inputs_for(unet_only, setup["manifest"])
    for k in both:
        np.testing.assert_array_equal(both[k], alone[k])
    te_zero = lora_inputs_for(unet_only, te_setup["manifest"])
    assert all(not v.any() for v in te_zero.values())


def test_text_encoder_layers_the_graph_lacks_are_named(te_setup, base, tmp_path):
    mlp = write_random_lora(tmp_path / "te_mlp.safetensors", base.unet, rank=2, alpha=2, seed=6, std=0.1,
                            text_encoder=base.text_encoder, te_target_modules=("q_proj", "fc1"))
    with pytest.raises(InvalidInputError, match=r"te_mlp.safetensors.*runtime-LoRA text encoder has no inputs.*fc1"):
        lora_inputs_for(mlp, te_setup["manifest"])


def test_export_adapts_the_callers_net_and_puts_it_back(base, tmp_path):
    """The export adapts the UNet itself (no second copy of its weights) and leaves it exactly as it was:
    the same layer objects, the same outputs."""
    import torch

    from facetron.export.runtime_lora import RuntimeLoraUNet, adapted

    unet = base.unet
    layers = {n: m for n, m in unet.named_modules()}
    feed = {k: torch.from_numpy(v) for k, v in unet_feed(1, seed=9).items()}
    with torch.no_grad():
        before = unet(feed["sample"], feed["timestep"], feed["encoder_hidden_states"], return_dict=False)[0]
    with adapted(RuntimeLoraUNet, unet) as module:
        name = module.modules_[0]
        assert module.unet is unet  # no copy: the wrappers hold the UNet's own layers
        assert type(unet.get_submodule(name)).__name__ == "_RuntimeLoraLinear"
        assert unet.get_submodule(name).base is layers[name]
    assert {n: m for n, m in unet.named_modules()} == layers
    with torch.no_grad():
        after = unet(feed["sample"], feed["timestep"], feed["encoder_hidden_states"], return_dict=False)[0]
    assert torch.equal(before, after)
