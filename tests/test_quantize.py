"""int8 UNet (``export/quantize.py``) on the tiny model.

* Calibration feeds come from real denoising trajectories: per generation the
  timesteps of the default scheduler, decreasing; every feed at the served
  shapes (a batch-2 guidance pair), the runtime-LoRA inputs (non-zero) in it.
* ``full``: the IR holds FakeQuantize nodes, none on the LoRA MatMuls (a
  user's LoRA is a graph input: it stays f32); it opens through
  ``open_runtime`` (the served path: OpenVINO reads the IR, a static graph per
  feed shape, compiled-model cache folder) and gives finite outputs of the
  right shape at two resolutions. ``weights``: int8 constants, no FakeQuantize.
* The deviation report (vs ONNX Runtime fp32 on held-out trajectories) per
  step and per image is printed (``-s``); asserted: finite, the OpenVINO fp32
  floor ~0, and weights-only deviating less than full int8 (it does on the
  tiny model by ~9x). The tiny model's weights are random: its deviations say
  nothing about SD-1.5's; ``benchmarks/runtimes.py --full`` measures those shapes.
* ``export repository --int8``: the unet's IR served (its deviation beside it); with ``--distill-lora`` the
  few-step ``unet_fewstep`` too, on its own trajectories (lcm, 4 steps, guidance 1), and a few-step generation
  served by Triton equals the in-process int8 one and stays near the fp32 one (tiny model, int8 weights:
  PSNR ~54 dB, max 3/255).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nncf")
ov = pytest.importorskip("openvino")

from facetron import contract  # noqa: E402
from facetron.atomic import ARTIFACT_MARKER  # noqa: E402
from facetron.diffusion.base_model import load_base_model  # noqa: E402
from facetron.diffusion.lora_inputs import read_lora_manifest  # noqa: E402
from facetron.errors import InvalidInputError  # noqa: E402
from facetron.export import quantize as q  # noqa: E402
from facetron.export.onnx_export import export_onnx  # noqa: E402
from facetron.export.onnx_graph import ModelDims, read_io  # noqa: E402
from facetron.export.runtime_lora import export_runtime_lora_text_encoder  # noqa: E402
from facetron.net_runtimes import open_runtime  # noqa: E402

RANK = 8
HELD_OUT = q.HELD_OUT_PROMPTS[:1]


@pytest.fixture(scope="module")
def nets(tmp_path_factory) -> q.ExportedNets:
    base = load_base_model()
    out = tmp_path_factory.mktemp("quantize") / "onnx"
    export_onnx(base, out, models=("vae_decoder",), runtime_lora_rank=RANK)
    export_runtime_lora_text_encoder(base.text_encoder, out, dims=ModelDims.of(base), rank=RANK)
    return q.ExportedNets.from_export(out, dict(base.scheduler.config))


@pytest.fixture(scope="module")
def calibration(nets) -> q.Calibration:
    return q.calibration_feeds(nets, q.CALIBRATION_PROMPTS[:2], seeds=(0,), threads=2)


@pytest.fixture(scope="module")
def full_ir(nets, calibration, tmp_path_factory) -> Path:
    return q.quantize_unet(nets.unet, calibration, tmp_path_factory.mktemp("int8") / "full", "full")


@pytest.fixture(scope="module")
def weights_ir(nets, tmp_path_factory) -> Path:
    return q.quantize_unet(nets.unet, None, tmp_path_factory.mktemp("int8") / "weights", "weights")


def test_calibration_feeds_come_from_trajectories(nets, calibration) -> None:
    steps = contract.DEFAULT_STEPS
    feeds = calibration.feeds
    assert len(feeds) == 2 * steps and calibration.steps == steps
    latent = nets.resolution // nets.latent_factor
    lora_names = {s.name for s in read_io(nets.unet.parent)[0] if s.name.startswith("lora_")}
    for i in range(2):  # each generation: decreasing timesteps, new latents every step
        run = feeds[i * steps:(i + 1) * steps]
        t = [float(f["timestep"][0]) for f in run]
        assert all(a > b for a, b in zip(t, t[1:])) and t[0] > 900, t
        assert all(np.array_equal(f["timestep"], [tt, tt]) for f, tt in zip(run, t))
        assert not any(np.array_equal(a["sample"], b["sample"]) for a, b in zip(run, run[1:]))
    for f in feeds:
        assert f["sample"].shape == (2, nets.latent_channels, latent, latent) and f["sample"].dtype == np.float32
        assert np.array_equal(f["sample"][0], f["sample"][1])  # guidance: one latent, uncond + cond
        hidden = f["encoder_hidden_states"]
        assert hidden.shape[:2] == (2, 77) and not np.allclose(hidden[0], hidden[1])  # negative vs prompt
        assert set(f) == {"sample", "timestep", "encoder_hidden_states"} | lora_names
        assert all(np.abs(f[k]).max() > 0 for k in lora_names)
    assert feeds[0]["encoder_hidden_states"] is not feeds[steps]["encoder_hidden_states"]  # two prompts
    info = calibration.info()
    assert info["prompts"] == list(q.CALIBRATION_PROMPTS[:2]) and info["samples"] == len(feeds)
    assert info["shapes"]["sample"] == [2, nets.latent_channels, latent, latent]


def test_full_int8_ir_is_quantized_and_served(nets, full_ir, tmp_path) -> None:
    folder = full_ir.parent
    assert sorted(p.name for p in folder.iterdir()) == sorted([ARTIFACT_MARKER, "model.bin", "model.xml",
                                                               q.REPORT_FILE])
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp folder left
    model = ov.Core().read_model(str(full_ir))
    types = {op.get_type_name() for op in model.get_ops()}
    assert "FakeQuantize" in types or "FakeConvert" in types
    lora = q.lora_matmuls(model)
    manifest = read_lora_manifest(nets.unet.parent)
    assert len(lora) == len(manifest["groups"]) + len(manifest["layers"])  # x @ A per group, t @ B per layer
    by_name = {op.get_friendly_name(): op for op in model.get_ops()}
    for name in lora:  # a user's LoRA is never int8: no quantizer in front of its MatMuls
        assert all(by_name[name].input_value(i).get_node().get_type_name() != "FakeQuantize" for i in range(2))
    report = json.loads((folder / q.REPORT_FILE).read_text())
    assert report["mode"] == "full" and report["ops"]["FakeQuantize"] > 0
    assert report["versions"]["nncf"] and report["versions"]["openvino"]
    cal = report["calibration"]
    assert cal["steps"] == contract.DEFAULT_STEPS and cal["seeds"] == [0] and len(cal["prompts"]) == 2
    assert report["quantize"]["subset_size"] == cal["samples"] == 2 * contract.DEFAULT_STEPS
    assert report["quantize"]["preset"] == "mixed" and report["lora_matmuls_kept_f32"] == len(lora)

    net = open_runtime(full_ir, "openvino", threads=2, cache=tmp_path / "ov-cache", reuse_inputs=True)
    assert net.runtime == "openvino" and net.output_names() == ["noise_pred"]
    lora_in = nets.lora()
    for latent in (nets.resolution // nets.latent_factor, 12):  # the calibrated shape and another one
        rng = np.random.default_rng(latent)
        feed = {"sample": rng.standard_normal((2, 4, latent, latent)).astype(np.float32),
                "timestep": np.full(2, 500.0, np.float32),
                "encoder_hidden_states": rng.standard_normal((2, 77, 32)).astype(np.float32), **lora_in}
        out = net.run(["noise_pred"], feed)[0]
        assert out.shape == (2, 4, latent, latent) and np.isfinite(out).all()
    assert net.runtime == "openvino"  # no fallback happened


def test_weights_mode_compresses_weights_only(weights_ir) -> None:
    model = ov.Core().read_model(str(weights_ir))
    ops = q.quantize_ops(model)
    assert ops["FakeQuantize"] == 0 and ops["int8_constants"] > 0
    report = json.loads((weights_ir.parent / q.REPORT_FILE).read_text())
    assert report["mode"] == "weights" and report["calibration"] is None


def test_hybrid_mode_int8_weights_everywhere_activations_in_convolutions_and_attention(nets, calibration) -> None:
    from facetron.net_runtimes import openvino_model

    linear = q.weighted_matmuls(openvino_model(nets.unet))
    model, params = q.quantize_model(openvino_model(nets.unet), calibration.feeds, "hybrid", subset_size=20)
    ops = q.quantize_ops(model)
    assert ops["FakeQuantize"] > 0 and ops["int8_constants"] > 0 and params["quantize"]["subset_size"] == 20
    by_name = {op.get_friendly_name(): op for op in model.get_ops()}
    assert linear and all(name in by_name for name in linear)
    for name in linear:  # linear layers: int8 weights (a decompression subgraph, no f32 constant), f32 activations
        matmul = by_name[name]
        assert matmul.input_value(0).get_node().get_type_name() != "FakeQuantize", name
        assert matmul.input_value(1).get_node().get_type_name() != "Constant", name
    convs = [op for op in model.get_ops() if op.get_type_name() == "Convolution"]
    assert any(c.input_value(0).get_node().get_type_name() == "FakeQuantize" for c in convs)


def test_deviation_per_step_and_per_image(nets, full_ir, weights_ir) -> None:
    report = q.deviation_report(nets, {"openvino_f32": nets.unet, "openvino_bf16": (nets.unet, "bf16"),
                                       "weights": weights_ir, "full": full_ir}, prompts=HELD_OUT, threads=2)
    print()
    for name, v in report["variants"].items():
        print(f"{name:13s} {v['ms_per_step']:7.2f} ms/step  per step rel L2 mean {v['step_rel_l2_mean']:.4g} "
              f"max {v['step_rel_l2_max']:.4g} max abs {v['step_max_abs']:.4g} | per image PSNR "
              f"{v['image_psnr_db_min']} dB, latents rel L2 {v['latents_rel_l2_max']:.4g}")
        print("    rel L2 per step:", " ".join(f"{x:.3g}" for x in v["per_step"][0]["rel_l2"]))
        steps = v["per_step"][0]
        assert len(steps["rel_l2"]) == len(steps["max_abs"]) == contract.DEFAULT_STEPS
        assert all(math.isfinite(x) for x in steps["rel_l2"] + steps["max_abs"])
        image = v["per_image"][0]
        assert image["psnr_db"] is None or math.isfinite(image["psnr_db"])
        assert math.isfinite(image["latents_rel_l2"]) and v["ms_per_step"] > 0
    for name in ("weights", "full"):
        print(name, q.within_tolerance(report, name))
    v = report["variants"]
    assert v["openvino_f32"]["step_rel_l2_max"] < 1e-4  # the runtime itself: the fp32 floor
    assert v["weights"]["step_rel_l2_mean"] < v["full"]["step_rel_l2_mean"]
    assert v["weights"]["latents_rel_l2_max"] < v["full"]["latents_rel_l2_max"]


def test_bad_requests_are_refused(nets, tmp_path) -> None:
    with pytest.raises(InvalidInputError, match="int8 mode"):
        q.quantize_unet(nets.unet, None, tmp_path / "a", "int4")
    with pytest.raises(InvalidInputError, match="calibration"):
        q.quantize_unet(nets.unet, [], tmp_path / "b", "full")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not facetron's")
    with pytest.raises(InvalidInputError, match="did not make"):
        q.quantize_unet(nets.unet, None, foreign, "weights")
    assert (foreign / "notes.txt").is_file()


def test_export_repository_int8_serves_the_ir_with_its_deviation(tmp_path) -> None:
    """``assemble_repository(int8="weights")``: the unet's version folder holds the IR, how it was made and
    how far it deviates; the served model opens the IR in OpenVINO (ONNX Runtime falls back to the fp32
    ONNX), and it stays near the fp32 graph; int8 needs OpenVINO and the cpu target, by name."""
    from facetron.contract import UnetParams
    from facetron.diffusion.lora_inputs import random_lora_inputs
    from facetron.export.onnx_graph import example_inputs
    from facetron.export.diffusion_source import DiffusionSource
    from facetron.export.repository import assemble_repository
    from facetron.pipeline.net_io import unet_graph

    with pytest.raises(InvalidInputError, match="--int8: expected one of off, weights, full, hybrid"):
        assemble_repository("cpu", tmp_path / "r0", int8="int4")
    with pytest.raises(InvalidInputError, match="--int8: quantizes the cpu target's UNet"):
        assemble_repository("gpu", tmp_path / "r0", int8="weights", diffusion=DiffusionSource(lora_rank=8))
    repo = assemble_repository("cpu", tmp_path / "repo", models=["unet"], diffusion=DiffusionSource(lora_rank=8),
                               int8="weights")
    folder = repo / "unet" / "1"
    report = json.loads((folder / "int8" / "quantization.json").read_text())
    verdict = json.loads((folder / "int8" / "deviation.json").read_text())["verdict"]
    assert report["mode"] == "weights" and "pass" in verdict and verdict["rule"]
    config = (repo / "unet" / "config.pbtxt").read_text()
    assert 'key: "int8"\n  value {\n    string_value: "weights"' in config
    assert 'key: "runtime"\n  value {\n    string_value: "openvino"' in config
    assert json.loads((repo / "runtime_choice.json").read_text())["int8"] == "weights"
    params = UnetParams(runtime="openvino", int8="weights")
    assert unet_graph(folder, params) == folder / "int8" / "model.xml"
    with pytest.raises(InvalidInputError, match="parameter int8: 'weights' needs runtime openvino"):
        unet_graph(folder, UnetParams(int8="weights"))
    inputs, _, _ = read_io(folder)
    feed = example_inputs([s for s in inputs if not s.name.startswith("lora_")], ModelDims.of(load_base_model()),
                          batch=2, seed=3)
    feed.update(random_lora_inputs(read_lora_manifest(folder), 2, seed=4, rank=4))
    served = open_runtime(unet_graph(folder, params), "openvino", 2, reuse_inputs=True,
                          fallback_path=folder / "model.onnx")
    got = served.run(["noise_pred"], feed)[0]
    want = open_runtime(folder / "model.onnx", "onnxruntime", 2).run(["noise_pred"], feed)[0]
    rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    print(f"served int8-weights UNet vs fp32 ONNX Runtime: rel L2 {rel:.4f}")
    assert served.runtime == "openvino" and 0 < rel < 0.05


@pytest.mark.slow  # ~40 s (a second int8 assembly + server; the unet's int8 path: the test above): make test-all
@pytest.mark.triton
def test_export_repository_int8_quantizes_the_fewstep_unet_too(distill_lora, tmp_path) -> None:
    """``--distill-lora`` + ``int8="weights"``: ``unet_fewstep`` gets its own IR (calibrated and judged on its own
    path: lcm, 4 steps, guidance 1), its deviation report and the ``int8`` parameter in OpenVINO f32, as the
    ``unet`` does; runtime_choice.json names both. A few-step generation served by Triton runs on unet_fewstep, equals
    the same generation in process with the int8 IR (the IR is what is served) and stays close to it with the fp32
    ONNX graph in ONNX Runtime (the f32 few-step result)."""
    from facetron.client import FacetronClient
    from facetron.contract import UnetParams
    from facetron.deviation import psnr_uint8
    from facetron.diffusion.clip_tokenizer import ClipTokenizer
    from facetron.diffusion.lora_inputs import zero_lora_inputs
    from facetron.diffusion.nets import DiffusionNets
    from facetron.export.diffusion_source import DiffusionSource
    from facetron.export.repository import assemble_repository
    from facetron.pipeline.generation import generate, read_model_info
    from facetron.pipeline.job import build_job
    from facetron.pipeline.net_io import unet_graph
    from facetron.request import GeneratorRequest
    from facetron.triton.server import TritonServer
    from facetron.users import UserRegistry

    fewstep, plain = contract.UNET_FEWSTEP.name, contract.UNET.name
    users = tmp_path / "users"
    UserRegistry(users)
    models = ["tokenizer", "text_encoder", plain, fewstep, "vae_decoder", "vae_encoder", "portrait_generator"]
    source = DiffusionSource(lora_rank=8, distill_lora=distill_lora.kohya, distill_weight=distill_lora.weight)
    repo = assemble_repository("cpu", tmp_path / "repo", models=models, diffusion=source, users_dir=users,
                               int8="weights")
    # 1. both UNets: their own IR, how it was made, how far it deviates on the path it serves; int8 + openvino
    for name, scheduler, steps, guidance in ((plain, contract.DEFAULT_SCHEDULER, contract.DEFAULT_STEPS,
                                              contract.DEFAULT_GUIDANCE),
                                             (fewstep, "lcm", contract.FEW_STEP_DEFAULT_STEPS,
                                              contract.FEW_STEP_DEFAULT_GUIDANCE)):
        folder = repo / name / "1"
        assert (folder / "int8" / "model.xml").is_file() and (folder / "int8" / "model.bin").is_file(), name
        report = json.loads((folder / "int8" / q.REPORT_FILE).read_text())
        assert report["mode"] == "weights" and report["source"].endswith(f"{name}/model.onnx"), report["source"]
        assert (report["calibration"]["scheduler"], report["calibration"]["steps"],
                report["calibration"]["guidance"]) == (scheduler, steps, guidance)
        deviation = json.loads((folder / "int8" / contract.INT8_DEVIATION).read_text())
        assert (deviation["report"]["scheduler"], deviation["report"]["steps"]) == (scheduler, steps)
        assert "pass" in deviation["verdict"] and deviation["verdict"]["rule"]
        weights = deviation["report"]["variants"]["weights"]
        assert len(weights["per_step"][0]["rel_l2"]) == steps and math.isfinite(weights["step_rel_l2_max"])
        print(f"{name}: int8 weights vs fp32 on {scheduler} x {steps}: per-step rel L2 max "
              f"{weights['step_rel_l2_max']:.4g}, image PSNR {weights['image_psnr_db_min']} dB, verdict "
              f"{deviation['verdict']['pass']}")
        config = (repo / name / "config.pbtxt").read_text()
        assert 'key: "int8"\n  value {\n    string_value: "weights"' in config, name
        assert 'key: "runtime"\n  value {\n    string_value: "openvino"' in config, name
        assert 'key: "precision"\n  value {\n    string_value: "f32"' in config, name
        assert unet_graph(folder, UnetParams(runtime="openvino", int8="weights")) == folder / "int8" / "model.xml"
    # the two IRs are two UNets (the distillation LoRA merged in one)
    assert (repo / plain / "1" / "int8" / "model.bin").read_bytes() != (repo / fewstep / "1" / "int8" /
                                                                        "model.bin").read_bytes()
    choice = json.loads((repo / "runtime_choice.json").read_text())
    assert choice["int8"] == "weights" and choice["int8_nets"] == [plain, fewstep]
    assert choice["runtimes"][fewstep] == "openvino" and choice["precisions"][fewstep] == "f32"
    assert choice["runtimes"]["text_encoder"] == "onnxruntime"  # the other nets as they were

    # 2. a few-step generation through Triton (no user: the base model + the distillation LoRA)
    request = {"scheduler": "lcm", "num_images": 1, "seed": 7}
    wire = {"scheduler": np.array([b"lcm"], dtype=object), "num_images": np.array([1], np.int32),
            "seed": np.array([7], np.int64)}
    log = tmp_path / "tritonserver.log"
    with TritonServer(repo, log_path=log, env={"FACETRON_USERS_DIR": str(users)}) as server:
        import tritonclient.grpc as grpcclient

        with FacetronClient(server.grpc_url, timeout_s=300) as client:
            served = client.infer("portrait_generator", wire, ["images"])["images"]
        with grpcclient.InferenceServerClient(server.grpc_url) as raw:
            counts = {m: int(raw.get_inference_statistics(m, headers=server.admin_headers, as_json=True)[
                "model_stats"][0]["inference_stats"]["success"].get("count", 0)) for m in (plain, fewstep)}
    text = log.read_text(errors="replace")
    assert "OpenVINO could not" not in text and "OpenVINO failed" not in text  # no fallback to the fp32 ONNX
    assert counts[fewstep] == contract.FEW_STEP_DEFAULT_STEPS and counts[plain] == 0, counts

    # 3. the same generation in process: the int8 IR in OpenVINO (what is served) and the fp32 ONNX graph in ORT
    info, sched = read_model_info(repo / "portrait_generator" / "1")
    job = build_job(GeneratorRequest(**request), info, UserRegistry(users))
    assert job.unet == fewstep and job.sampling.steps == contract.FEW_STEP_DEFAULT_STEPS
    folder = repo / fewstep / "1"
    zero = zero_lora_inputs(read_lora_manifest(folder))
    te = open_runtime(repo / "text_encoder" / "1" / "model.onnx", "onnxruntime", 1)
    te_zero = zero_lora_inputs(read_lora_manifest(repo / "text_encoder" / "1"))
    vae = open_runtime(repo / "vae_decoder" / "1" / "model.onnx", "onnxruntime", 1)

    def nets(unet) -> DiffusionNets:
        def unet_fn(s, t, h):
            lora = {k: np.repeat(v, len(s), 0) for k, v in zero.items()}
            return unet.run(["noise_pred"], {"sample": s, "timestep": t, "encoder_hidden_states": h, **lora})[0]

        def te_fn(ids):
            return te.run(None, {"input_ids": ids, **{k: np.repeat(v, len(ids), 0) for k, v in te_zero.items()}})[0]

        return DiffusionNets(tokenize=ClipTokenizer(), text_encode=te_fn, unet=unet_fn,
                             vae_decode=lambda lat: vae.run(None, {"latent": lat})[0], latent_channels=4,
                             latent_factor=8)

    int8 = generate(nets(open_runtime(folder / "int8" / "model.xml", "openvino", 1, fallback=False)), sched,
                    job.prompt, job.negative_prompt, job.sampling)
    f32 = generate(nets(open_runtime(folder / "model.onnx", "onnxruntime", 1)), sched, job.prompt,
                   job.negative_prompt, job.sampling)
    assert served.shape == int8.shape == f32.shape
    served_vs_int8 = np.abs(served.astype(int) - int8.astype(int))
    served_vs_f32 = np.abs(served.astype(int) - f32.astype(int))
    psnr = psnr_uint8(served, f32)
    print(f"served int8-weights unet_fewstep (lcm x {job.sampling.steps}) vs in-process int8: max "
          f"{served_vs_int8.max()}/255; vs f32 ONNX Runtime: PSNR {psnr:.2f} dB, max {served_vs_f32.max()}/255, "
          f"mean {served_vs_f32.mean():.3f}")
    assert served_vs_int8.max() <= 2 and served_vs_int8.mean() <= 0.05, (served_vs_int8.max(), served_vs_int8.mean())
    assert served_vs_f32.max() > 0  # the served UNet is the IR, not the fp32 graph
    assert psnr > 30, psnr
