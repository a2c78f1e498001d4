"""ONNX export of the tiny model: contract (names, dtypes, dynamic axes, opset),
ORT-vs-torch validation, external data, fp16, atomic writes, CLI. The
SD-1.5-shape export (> 2 GB, external data) is the slow test at the end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from facetron.atomic import ARTIFACT_MARKER
from facetron.diffusion.base_model import load_base_model
from facetron.errors import InvalidInputError
from facetron.export.onnx_export import MANIFEST_FILE, export_model, export_onnx, graph_module
from facetron.export.onnx_graph import DATA_FILE, MODEL_FILE, ModelDims, example_inputs, model_io
from facetron.export.validate import REPORT_FILE, TOLERANCES, validate_export

ORT_DTYPES = {"FP32": "tensor(float)", "INT32": "tensor(int32)", "UINT8": "tensor(uint8)"}


@pytest.fixture(scope="module")
def base():
    return load_base_model()


@pytest.fixture(scope="module")
def exported(base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "export"
    export_onnx(base, out)
    return out


def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def test_contract_names_dtypes_dims(base, exported):
    dims = ModelDims.of(base)
    manifest = json.loads((exported / MANIFEST_FILE).read_text())
    assert set(manifest["models"]) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    for name in manifest["models"]:
        path = exported / name / MODEL_FILE
        model = onnx.load(str(path))
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
        sess = session(path)
        inputs, outputs = model_io(name, dims)
        for got, want in ((sess.get_inputs(), inputs), (sess.get_outputs(), outputs)):
            assert [g.name for g in got] == [w.name for w in want], name
            for g, w in zip(got, want):
                assert g.type == ORT_DTYPES[w.dtype], (name, g.name)
                assert tuple(g.shape) == w.dims, (name, g.name, g.shape)  # symbols N,h,w,H,W stay dynamic
        io = json.loads((exported / name / "io.json").read_text())
        assert io["inputs"] == [w.to_json() for w in inputs] and io["external_data"] is None
    assert manifest["dims"]["text_hidden"] == 32


@pytest.mark.parametrize("name,batch,latent", [("unet", 3, 24), ("vae_decoder", 1, 8), ("vae_encoder", 3, 24),
                                               ("text_encoder", 5, 16)])
def test_dynamic_batch_and_size_match_torch(base, exported, name, batch, latent):
    dims = ModelDims.of(base)
    inputs, outputs = model_io(name, dims)
    feed = example_inputs(inputs, dims, batch=batch, latent=latent, seed=7)
    got = session(exported / name / MODEL_FILE).run(None, feed)[0]
    module = graph_module(name, unet=base.unet, vae=base.vae, text_encoder=base.text_encoder)
    with torch.no_grad():
        ref = module(*[torch.from_numpy(feed[s.name]) for s in inputs]).numpy()
    assert got.shape == ref.shape == outputs[0].shape(N=batch, h=latent, w=latent, H=8 * latent, W=8 * latent)
    atol, rtol = TOLERANCES[name]
    np.testing.assert_allclose(got.astype(np.float64), ref.astype(np.float64), atol=atol, rtol=rtol)


def test_vae_decoder_includes_scaling_and_uint8_nhwc(base, exported):
    latent = np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype(np.float32)
    images = session(exported / "vae_decoder" / MODEL_FILE).run(None, {"latent": latent})[0]
    with torch.no_grad():
        x = base.vae.decode(torch.from_numpy(latent) / base.vae.config.scaling_factor).sample
    ref = ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert images.dtype == np.uint8 and images.shape == (1, 128, 128, 3)
    assert np.abs(images.astype(int) - ref.astype(int)).max() <= 1


def test_vae_encoder_is_mean_times_scaling(base, exported):
    img = np.random.default_rng(1).integers(0, 256, (2, 128, 128, 3)).astype(np.uint8)
    latent = session(exported / "vae_encoder" / MODEL_FILE).run(None, {"images": img})[0]
    x = torch.from_numpy(img).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        ref = (base.vae.encode(x).latent_dist.mean * base.vae.config.scaling_factor).numpy()
    np.testing.assert_allclose(latent, ref, atol=1e-4, rtol=1e-4)


def test_validate_report(base, exported):
    report = validate_export(exported, base_model=base)
    assert report["pass"], json.dumps(report, indent=1)
    saved = json.loads((exported / REPORT_FILE).read_text())
    assert saved["pass"] and set(saved["models"]) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    for name, entry in saved["models"].items():
        for out in entry["outputs"].values():
            assert {"max_abs", "max_rel", "atol", "rtol", "pass"} <= set(out)
            assert out["max_abs"] <= TOLERANCES[name][0]
    print({n: {o: (r["max_abs"], r["max_rel"]) for o, r in e["outputs"].items()} for n, e in saved["models"].items()})


def test_validate_flags_a_wrong_model(base, exported, tmp_path):
    """The check can fail: validate the export against a base with other weights."""
    import copy

    unet = copy.deepcopy(base.unet)
    with torch.no_grad():
        unet.conv_out.bias.add_(0.5)
    report = validate_export(exported, base_model=base, unet=unet, models=["unet"], report_path=tmp_path / "r.json")
    assert not report["pass"] and not report["models"]["unet"]["outputs"]["noise_pred"]["pass"]


def test_external_data_single_file(base, tmp_path):
    path = export_model("text_encoder", tmp_path, text_encoder=base.text_encoder, dims=ModelDims.of(base),
                        external_threshold=0)
    files = sorted(p.name for p in path.parent.iterdir())
    assert files == [ARTIFACT_MARKER, "io.json", MODEL_FILE, DATA_FILE]
    assert path.stat().st_size < (path.parent / DATA_FILE).stat().st_size
    feed = {"input_ids": np.full((1, 77), 49407, np.int32)}
    with torch.no_grad():
        ref = graph_module("text_encoder", text_encoder=base.text_encoder)(torch.from_numpy(feed["input_ids"])).numpy()
    np.testing.assert_allclose(session(path).run(None, feed)[0], ref, atol=1e-4)


def test_fp16_weights_keep_fp32_io(base, tmp_path):
    path = export_model("unet", tmp_path, unet=base.unet, dims=ModelDims.of(base), fp16=True)
    model = onnx.load(str(path))
    kinds = {init.data_type for init in model.graph.initializer if len(init.dims) >= 2}
    assert kinds == {onnx.TensorProto.FLOAT16}
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [onnx.TensorProto.FLOAT] * 3
    from facetron.export.validate import FP16_TOLERANCES, validate_model

    entry = validate_model("unet", path.parent, base)  # fp16 graph vs the fp32 torch UNet
    assert entry["outputs"]["noise_pred"]["atol"] == FP16_TOLERANCES["unet"][0]
    assert entry["pass"] and entry["fp16_weights"]


def test_interrupted_export_leaves_nothing(base, tmp_path, monkeypatch):
    import facetron.export.onnx_graph as ox

    def crash(model, path, *_):
        Path(path).write_bytes(b"half-written")
        raise RuntimeError("simulated crash while saving")

    monkeypatch.setattr(ox, "_write_onnx", crash)
    with pytest.raises(RuntimeError, match="simulated"):
        export_onnx(base, tmp_path / "out", models=["text_encoder"])
    assert list((tmp_path / "out").iterdir()) == []  # no text_encoder/, no temp folder, no manifest


def test_unwritable_out_is_named(base, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidInputError, match="--out .*file/x"):
        export_onnx(base, tmp_path / "file" / "x", models=["text_encoder"])


def test_unknown_model_and_low_opset_are_named(base, tmp_path):
    with pytest.raises(InvalidInputError, match="--models.*'vae'"):
        export_onnx(base, tmp_path / "o", models=["vae"])
    with pytest.raises(InvalidInputError, match="--opset"):
        export_onnx(base, tmp_path / "o", models=["text_encoder"], opset=13)


def test_cli_onnx_with_lora_then_validate(base, tmp_path, monkeypatch, capsys):
    import facetron.cli as cli
    from facetron.training.random_lora import write_random_lora

    lora = write_random_lora(tmp_path / "face.safetensors", base.unet, rank=4, alpha=8, seed=5, std=0.1)
    out = tmp_path / "onnx"
    assert cli.main(["export", "onnx", "--face-lora", str(lora), "--models", "unet", "--out", str(out)]) == 0
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["source"]["loras"][0]["weight"] == 0.9 and "not portraits" in manifest["note"]
    # the merged UNet differs from the base: validation must redo the merge from the manifest to pass
    assert cli.main(["export", "validate", "--onnx-dir", str(out)]) == 0
    assert "PASS" in capsys.readouterr().out
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["models"]["unet"]["pass"]


# ----------------------------------------------------------------------------- SD-1.5 shapes


@pytest.mark.slow
def test_sd15_unet_export_uses_one_external_data_file(tmp_path):
    """~1-2 min, ~3.4 GB disk (removed at the end): the > 2 GB path (protobuf limit) with real SD-1.5 shapes."""
    from types import SimpleNamespace

    from facetron.diffusion.base_model import build_models
    from facetron.diffusion.model_spec import SD15

    unet, vae, te = build_models(SD15)
    dims = ModelDims.of(SimpleNamespace(unet=unet, vae=vae, text_encoder=te, resolution=512, latent_factor=8))
    del vae, te
    path = export_model("unet", tmp_path, unet=unet, dims=dims, batch=1)
    try:
        files = sorted(p.name for p in path.parent.iterdir())
        assert files == [ARTIFACT_MARKER, "io.json", MODEL_FILE, DATA_FILE]
        assert (path.parent / DATA_FILE).stat().st_size > 2**31
        assert json.loads((path.parent / "io.json").read_text())["external_data"] == DATA_FILE
        inputs, _ = model_io("unet", dims)
        feed = example_inputs(inputs, dims, batch=1, latent=32, seed=0)
        got = session(path).run(None, feed)[0]
        with torch.no_grad():
            ref = graph_module("unet", unet=unet)(*[torch.from_numpy(feed[s.name]) for s in inputs]).numpy()
        np.testing.assert_allclose(got, ref, atol=TOLERANCES["unet"][0], rtol=TOLERANCES["unet"][1])
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)  # pytest keeps old tmp dirs: do not leave 3.4 GB behind
