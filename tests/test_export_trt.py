"""TensorRT: the one-line skip where it does not import (this CPU machine),
the trtexec lines for operators, and — where TensorRT imports and a GPU is
present — a real fp16 build with REFIT and a refit with merged weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from facetron.export.onnx_graph import IO_FILE, MODEL_FILE, ModelDims, model_io
from facetron.export.trt import (ENGINE_FILE, ProfileSizes, TensorRTUnavailable, build_engine, import_tensorrt,
                                 profile_shapes, refit_engine, tensorrt_unavailable_reason, trtexec_commands)

SD15_DIMS = ModelDims(text_hidden=768, unet_in_channels=4, unet_out_channels=4, latent_channels=4, latent_factor=8,
                      latent_size=64, scaling_factor=0.18215)


def fake_export(root: Path, dims: ModelDims = SD15_DIMS) -> Path:
    """io.json + placeholder model.onnx per model: all trtexec_commands reads."""
    for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        inputs, outputs = model_io(name, dims)
        (root / name).mkdir(parents=True)
        (root / name / MODEL_FILE).write_bytes(b"")
        (root / name / IO_FILE).write_text(json.dumps({"inputs": [s.to_json() for s in inputs],
                                                       "outputs": [s.to_json() for s in outputs]}))
    return root


@pytest.mark.skipif(tensorrt_unavailable_reason() is None, reason="TensorRT imports here")
def test_unavailable_is_one_clear_line(tmp_path):
    with pytest.raises(TensorRTUnavailable) as err:
        import_tensorrt()
    msg = str(err.value)
    assert msg.startswith("TensorRT not available here: ") and "\n" not in msg
    assert "tensorrt" in msg.lower()
    assert tensorrt_unavailable_reason() == msg
    for call in (lambda: build_engine(tmp_path / "m.onnx", tmp_path / "m.plan", {}),
                 lambda: refit_engine(tmp_path / "m.plan", tmp_path / "m.onnx")):
        with pytest.raises(TensorRTUnavailable, match="^TensorRT not available here: "):
            call()
    assert not list(tmp_path.iterdir())


def test_trtexec_commands(tmp_path):
    onnx_dir = fake_export(tmp_path / "onnx")
    lines = trtexec_commands(onnx_dir, "/engines")
    by_model = {Path(line.split("--onnx=")[1].split()[0]).parent.name: line for line in lines}
    assert set(by_model) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    unet = by_model["unet"]
    assert unet.startswith("trtexec --onnx=") and "--saveEngine=/engines/unet/model.plan" in unet
    assert " --fp16 --refit " in unet
    assert "--minShapes=sample:1x4x64x64,timestep:1,encoder_hidden_states:1x77x768" in unet
    assert "--optShapes=sample:2x4x64x64,timestep:2,encoder_hidden_states:2x77x768" in unet
    assert "--maxShapes=sample:4x4x96x96,timestep:4,encoder_hidden_states:4x77x768" in unet
    assert "--refit" not in by_model["text_encoder"]
    assert "--minShapes=input_ids:1x77 " in by_model["text_encoder"]
    assert "--maxShapes=latent:4x4x96x96" in by_model["vae_decoder"]
    assert "--minShapes=images:1x512x512x3" in by_model["vae_encoder"]
    assert "--maxShapes=images:4x768x768x3" in by_model["vae_encoder"]
    print("\n".join(lines))


def test_profiles_follow_io_specs():
    inputs, _ = model_io("unet", SD15_DIMS)
    shapes = profile_shapes(inputs, ProfileSizes(batch=(1, 2, 4), image=(512, 512, 768)))
    assert shapes["sample"] == ((1, 4, 64, 64), (2, 4, 64, 64), (4, 4, 96, 96))
    assert shapes["timestep"] == ((1,), (2,), (4,))


def test_cli_trt_prints_commands(tmp_path, monkeypatch, capsys):
    import facetron.cli as cli

    onnx_dir = fake_export(tmp_path / "onnx")
    rc = cli.main(["export", "trt", "--onnx-dir", str(onnx_dir)])
    out = capsys.readouterr().out
    if tensorrt_unavailable_reason() is not None:
        assert rc == 3 and out.startswith("[export trt] TensorRT not available here: ")
        assert out.count("trtexec --onnx=") == 4


# ----------------------------------------------------------------------------- real TensorRT (GPU hosts)


@pytest.fixture(scope="module")
def tiny_unet_exports(tmp_path_factory):
    reason = tensorrt_unavailable_reason()  # "TensorRT not available here: <import error>"
    if reason:
        pytest.skip(reason)
    import torch

    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    from facetron.diffusion.base_model import load_base_model
    from facetron.export.merge import merge_loras
    from facetron.export.onnx_export import export_model
    from facetron.training.random_lora import write_random_lora

    base = load_base_model()
    d = tmp_path_factory.mktemp("trt")
    dims = ModelDims.of(base)
    plain = export_model("unet", d / "base", unet=base.unet, dims=dims)
    lora = write_random_lora(d / "face.safetensors", base.unet, rank=4, alpha=8, seed=1, std=0.1)
    merged_unet, _ = merge_loras(base, lora)
    merged = export_model("unet", d / "merged", unet=merged_unet, dims=dims)
    return d, plain, merged


def test_build_refittable_unet_and_refit(tiny_unet_exports):
    from facetron.export.onnx_graph import read_io

    d, plain, merged = tiny_unet_exports
    inputs, _, _ = read_io(plain.parent)
    shapes = profile_shapes(inputs, ProfileSizes(batch=(1, 2, 4), image=(128, 128, 192)))
    engine = build_engine(plain, d / "engines" / "unet" / ENGINE_FILE, shapes, fp16=True, refit=True)
    assert engine.stat().st_size > 0
    result = refit_engine(engine, merged, d / "engines" / "unet_user" / ENGINE_FILE)
    assert result["weights_set"] > 0
