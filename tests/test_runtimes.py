"""Every runtime of a served net gives ONNX Runtime's outputs (tiny model).

OpenVINO (``facetron.net_runtimes``) runs the same ONNX files as ONNX
Runtime; per net its outputs must equal ONNX Runtime's within the export
validation tolerance (``export/validate.py``: ONNX Runtime is the runtime
validated against torch there): text encoder, VAE decoder / encoder, and the
runtime-LoRA UNet fed a real (non-zero) LoRA through the numpy reader the
served ``unet`` uses. Also: the fallback to ONNX Runtime (one log line,
never a dead model), the input metadata ``check_feed`` reads, the thread
rule, ``--cpu-runtime`` at assembly (fixed and ``auto``), and one served
check: a repository whose nets run in OpenVINO serves ``portrait_generator``
images within 2/255 of the same generation in ONNX Runtime.

Timings are never asserted here (benchmarks/runtimes.py reports them)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from facetron.diffusion.base_model import load_base_model
from facetron.diffusion.lora_inputs import lora_inputs_for, read_lora_manifest
from facetron.errors import FacetronError, InvalidInputError
from facetron.export.onnx_export import export_onnx
from facetron.export.onnx_graph import ModelDims, example_inputs, read_io
from facetron.export.validate import TOLERANCES, compare
from facetron import net_runtimes as runtimes
from facetron.pipeline.net_io import check_feed
from facetron.net_runtimes import OpenVinoRuntime, open_runtime, openvino_config, resolve_threads
from user_tokens import grant  # noqa: E402

pytest.importorskip("openvino")

NETS = ("text_encoder", "vae_decoder", "vae_encoder", "unet_lora")
W_FACE = 0.9


@pytest.fixture(scope="module")
def base():
    return load_base_model()


@pytest.fixture(scope="module")
def exported(base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runtimes") / "onnx"
    export_onnx(base, out, models=("text_encoder", "vae_decoder", "vae_encoder"), runtime_lora_rank=8)
    return out


@pytest.fixture(scope="module")
def face_lora(base, tmp_path_factory) -> Path:
    from facetron.training.random_lora import write_random_lora

    return write_random_lora(tmp_path_factory.mktemp("lora") / "face.safetensors", base.unet, rank=4, alpha=8,
                             seed=11, std=0.1)


def _feed(name: str, exported: Path, base, face_lora: Path, batch: int = 2, latent: int | None = None) -> dict:
    inputs, _, _ = read_io(exported / name)
    feed = example_inputs(inputs, ModelDims.of(base), batch=batch, latent=latent, seed=3,
                          vocab=int(base.text_encoder.config.vocab_size))
    if name == "unet_lora":
        lora = lora_inputs_for(face_lora, read_lora_manifest(exported / name), W_FACE, batch=batch)
        assert any(np.abs(v).max() > 0 for k, v in lora.items() if k.startswith("lora_b_")), "the LoRA must be real"
        feed.update(lora)
    return feed


@pytest.mark.parametrize("name", NETS)
def test_openvino_equals_onnxruntime(name, exported, base, face_lora) -> None:
    path = exported / name / "model.onnx"
    ort_net = open_runtime(path, "onnxruntime", 1)
    ov_net = open_runtime(path, "openvino", 1, fallback=False, cache=False)
    assert ov_net.runtime == "openvino" and ort_net.runtime == "onnxruntime"
    # the metadata check_feed reads: same names, types and fixed dims as ONNX Runtime's
    assert [(i.name, i.type) for i in ov_net.get_inputs()] == [(i.name, i.type) for i in ort_net.get_inputs()]
    for a, b in zip(ov_net.get_inputs(), ort_net.get_inputs()):
        assert [d if isinstance(d, int) else None for d in a.shape] == \
               [d if isinstance(d, int) else None for d in b.shape], a.name
    assert ov_net.output_names() == ort_net.output_names()
    atol, rtol = TOLERANCES[name]
    for batch, latent in ((2, None), (1, 8)):  # dynamic shapes: the served batch and a smaller latent
        feed = _feed(name, exported, base, face_lora, batch, latent)
        ref, got = ort_net.run(None, feed)[0], ov_net.run(None, feed)[0]
        stats = compare(got, ref, atol, rtol)
        assert got.dtype == ref.dtype and stats["pass"], (name, batch, latent, stats)


def test_openvino_static_shapes_equal_dynamic(exported, base, face_lora) -> None:
    feed = _feed("unet_lora", exported, base, face_lora)
    path = exported / "unet_lora" / "model.onnx"
    static = OpenVinoRuntime(path, 1, shapes={k: v.shape for k, v in feed.items()})
    assert static.get_inputs()[0].shape == (2, 4, 16, 16)
    ref = open_runtime(path, "onnxruntime", 1).run(["noise_pred"], feed)[0]
    assert compare(static.run(["noise_pred"], feed)[0], ref, *TOLERANCES["unet_lora"])["pass"]


def test_openvino_static_graph_per_feed_shape(exported, base, face_lora) -> None:
    """Served default: one static graph per feed shape set, compiled on first use, an LRU of
    ``static_shapes``; every shape's output equals ONNX Runtime's within the validation tolerance."""
    path = exported / "unet_lora" / "model.onnx"
    ort_net = open_runtime(path, "onnxruntime", 1)
    net = open_runtime(path, "openvino", 1, fallback=False, cache=False, static_shapes=2)
    assert net.static_shapes == 2 and net.compiles == 0
    assert net.get_inputs()[0].shape == (None, 4, None, None)  # the spec check_feed reads stays dynamic
    feeds = [_feed("unet_lora", exported, base, face_lora, b, latent) for b, latent in ((2, None), (1, 8), (2, 8))]
    for i, feed in enumerate(feeds + [feeds[2], feeds[1], feeds[0]]):
        got, ref = net.run(["noise_pred"], feed)[0], ort_net.run(["noise_pred"], feed)[0]
        assert compare(got, ref, *TOLERANCES["unet_lora"])["pass"], i
    # compiled: shapes 0, 1, 2 (evicts 0), 2 and 1 hit, 0 again (evicts 2)
    assert net.compiles == 4
    assert [s["sample"] for s in net.compiled_shapes] == [(1, 4, 8, 8), (2, 4, 16, 16)]
    with pytest.raises(ValueError, match="does not fit"):  # a wrong rank is refused before any compile
        net.run(None, {**feeds[0], "sample": feeds[0]["sample"][0]})
    assert net.compiles == 4


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_reused_inputs_give_the_plain_outputs(runtime, exported, base, face_lora) -> None:
    """``reuse_inputs`` (the served ``unet``): an array object seen in the previous call stays
    bound; outputs equal a plain call's bit for bit whether the LoRA arrays are the same
    objects, new objects, or the same objects changed in place (the binding shares memory)."""
    path = exported / "unet_lora" / "model.onnx"
    plain = open_runtime(path, runtime, 1, fallback=False, cache=False)
    reused = open_runtime(path, runtime, 1, fallback=False, cache=False, reuse_inputs=True)
    one, two = (_feed("unet_lora", exported, base, face_lora, 2) for _ in range(2))  # equal values, other objects
    lora = {k: v for k, v in one.items() if k.startswith("lora_")}
    rng = np.random.default_rng(5)
    outs = []
    for step in range(4):  # a denoising loop: new UNet inputs every step
        unet_in = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in one.items()
                   if not k.startswith("lora_") and k != "timestep"}
        unet_in["timestep"] = one["timestep"] + step
        if step == 2:
            lora["lora_b_0"] *= 2.0  # in place: the same object, new values
        if step == 3:
            lora = {k: v.copy() for k, v in lora.items()}  # new objects, same values
        feed = {**unet_in, **lora}
        want = plain.run(["noise_pred"], feed)[0]
        outs.append(reused.run(["noise_pred"], feed)[0])
        assert np.array_equal(outs[-1], want), step
    other_feed = {**feed, **{k: v for k, v in two.items() if k.startswith("lora_")}}  # the undoubled LoRA again
    other = reused.run(["noise_pred"], other_feed)[0]
    assert np.array_equal(other, plain.run(["noise_pred"], other_feed)[0]) and not np.array_equal(other, outs[-1])
    missing = dict(feed)
    del missing["lora_a_0"]
    with pytest.raises(Exception, match="lora_a_0"):  # nothing stale stays bound
        reused.run(["noise_pred"], missing)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_reused_inputs_take_read_only_arrays(runtime, exported, base, face_lora) -> None:
    """A read-only input (a broadcast view, a Triton input tensor) works with ``reuse_inputs`` and gives the
    plain call's output: OpenVINO cannot share a read-only buffer (``ov.Tensor(shared_memory=True)`` raised
    "array is not writeable" on the batch-1 LoRA arrays of a few-step request)."""
    path = exported / "unet_lora" / "model.onnx"
    plain = open_runtime(path, runtime, 1, fallback=False, cache=False)
    reused = open_runtime(path, runtime, 1, fallback=False, cache=False, reuse_inputs=True)
    feed = _feed("unet_lora", exported, base, face_lora, 1)
    frozen = {}
    for name, arr in feed.items():
        frozen[name] = arr.copy()
        frozen[name].setflags(write=False)
    assert np.array_equal(reused.run(["noise_pred"], frozen)[0], plain.run(["noise_pred"], feed)[0])


def test_lora_inputs_are_writable_at_every_batch(face_lora, exported) -> None:
    """``lora_inputs_for`` hands over arrays of their own (batch 1 was a read-only broadcast view)."""
    from facetron.diffusion.lora_inputs import lora_inputs_for, read_lora_manifest

    for batch in (1, 2):
        arrays = lora_inputs_for(face_lora, read_lora_manifest(exported / "unet_lora"), 1.0, batch=batch)
        assert all(a.flags.writeable and a.flags.c_contiguous and a.shape[0] == batch for a in arrays.values())


def test_check_feed_reads_openvino_metadata(exported, base, face_lora) -> None:
    net = open_runtime(exported / "unet_lora" / "model.onnx", "openvino", 1, fallback=False, cache=False)
    feed = _feed("unet_lora", exported, base, face_lora)
    check_feed(feed, net)
    bad = dict(feed, sample=np.zeros((2, 3, 16, 16), np.float32))
    with pytest.raises(InvalidInputError, match="sample: dimension 1 must be 4"):
        check_feed(bad, net)
    with pytest.raises(InvalidInputError, match="encoder_hidden_states: expected dtype float32"):
        check_feed(dict(feed, encoder_hidden_states=feed["encoder_hidden_states"].astype(np.float64)), net)


def test_compile_failure_falls_back_with_one_line(exported, monkeypatch, caplog) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("Exception from src/plugins/intel_cpu: no kernel\nsecond line")

    monkeypatch.setattr(runtimes, "OpenVinoRuntime", broken)
    with caplog.at_level(logging.WARNING, logger="facetron.runtimes"):
        net = open_runtime(exported / "vae_decoder" / "model.onnx", "openvino", 1)
    assert net.runtime == "onnxruntime"
    (record,) = [r for r in caplog.records if r.name == "facetron.runtimes"]
    msg = record.getMessage()
    assert "\n" not in msg and "OpenVINO could not load or compile" in msg and "vae_decoder" in msg
    assert "no kernel second line" in msg and "ONNX Runtime" in msg
    with pytest.raises(RuntimeError, match="no kernel"):
        open_runtime(exported / "vae_decoder" / "model.onnx", "openvino", 1, fallback=False)


def test_run_failure_moves_to_onnxruntime_for_good(exported, base, face_lora, caplog) -> None:
    net = open_runtime(exported / "text_encoder" / "model.onnx", "openvino", 1, cache=False)
    feed = _feed("text_encoder", exported, base, face_lora)
    ref = net.run(None, feed)[0]
    # a feed that no runtime accepts: its error is raised, OpenVINO stays
    with pytest.raises(Exception):
        net.run(None, {"input_ids": np.zeros((2, 5, 5), np.int32)})
    assert net.runtime == "openvino"

    def broken(*args):
        raise RuntimeError("infer request failed")

    net._primary.run = broken
    with caplog.at_level(logging.WARNING, logger="facetron.runtimes"):
        got = net.run(None, feed)[0]
    assert net.runtime == "onnxruntime"
    assert any("OpenVINO failed to run this net (RuntimeError: infer request failed)" in r.getMessage()
               for r in caplog.records)
    assert compare(got, ref, *TOLERANCES["text_encoder"])["pass"]


def test_bf16_is_opt_in_and_close(exported, base, face_lora, caplog) -> None:
    """precision=bf16 (OpenVINO only): the compiled graph really runs bf16 and stays
    near f32 (a few % rel. L2 on the runtime-LoRA UNet); ONNX Runtime says it runs f32."""
    import logging

    import openvino as ov

    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):  # e.g. an AVX2-only AMD EPYC
        pytest.skip("this CPU has no bf16 kernels in OpenVINO (OPTIMIZATION_CAPABILITIES lacks BF16): "
                    "a bf16 hint compiles to f32 here")
    path = exported / "unet_lora" / "model.onnx"
    feed = _feed("unet_lora", exported, base, face_lora)
    f32 = open_runtime(path, "openvino", 1, fallback=False, cache=False).run(["noise_pred"], feed)[0]
    bf16_net = open_runtime(path, "openvino", 1, fallback=False, cache=False, precision="bf16")
    bf16 = bf16_net.run(["noise_pred"], feed)[0]
    assert "bfloat16" in str(bf16_net.compiled.get_property("INFERENCE_PRECISION_HINT"))
    rel = float(np.linalg.norm(bf16 - f32) / np.linalg.norm(f32))
    assert 0 < rel < 0.1, rel
    with pytest.raises(InvalidInputError, match="precision: expected one of f32, bf16, got 'fp8'"):
        open_runtime(path, "openvino", precision="fp8")
    with caplog.at_level(logging.WARNING):
        open_runtime(path, "onnxruntime", 1, precision="bf16")
    assert "applies to OpenVINO only" in caplog.text


def test_runtime_rules(exported, monkeypatch) -> None:
    with pytest.raises(InvalidInputError, match="runtime: expected one of onnxruntime, openvino, got 'tvm'"):
        open_runtime(exported / "vae_decoder" / "model.onnx", "tvm")
    with pytest.raises(FacetronError, match="is missing"):
        open_runtime(exported / "nothing" / "model.onnx", "openvino")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert resolve_threads(None) == 3 and resolve_threads(0) == 3 and resolve_threads(2) == 2
    cfg = openvino_config(None, cache=Path("/tmp/x"))
    assert cfg["INFERENCE_NUM_THREADS"] == 3 and cfg["INFERENCE_PRECISION_HINT"] == "f32"
    assert cfg["PERFORMANCE_HINT"] == "LATENCY" and cfg["CACHE_DIR"] == "/tmp/x"
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert "INFERENCE_NUM_THREADS" not in openvino_config(None)
    for static in (0, 2):  # one dynamic graph, or static graphs compiled per feed shape (the served default)
        net = open_runtime(exported / "vae_decoder" / "model.onnx", "openvino", 1, fallback=False, cache=False,
                           static_shapes=static)
        if static:
            assert net.compiled is None  # nothing compiled before the first feed
            net.run(None, {"latent": np.zeros((1, 4, 8, 8), np.float32)})
        assert "float32" in str(net.compiled.get_property("INFERENCE_PRECISION_HINT"))  # not the bf16 default
        assert int(net.compiled.get_property("INFERENCE_NUM_THREADS")) == 1
    with pytest.raises(InvalidInputError, match="static_shapes"):
        OpenVinoRuntime(exported / "vae_decoder" / "model.onnx", 1, static_shapes=-1)


def test_the_compiled_model_cache_keeps_precisions_and_files_apart(exported, base, face_lora, tmp_path) -> None:
    """OpenVINO's cache key ignores the precision: an f32 blob imported for a bf16 compile gave NaN. Each
    precision and each ONNX file has its own cache folder, so a warm cache gives what a cold compile gives."""
    from facetron.net_runtimes import model_cache_folder

    path = exported / "unet_lora" / "model.onnx"
    feed = _feed("unet_lora", exported, base, face_lora)
    cold = {p: open_runtime(path, "openvino", 1, fallback=False, cache=False, precision=p).run(None, feed)[0]
            for p in ("f32", "bf16")}
    for _ in range(2):  # first pass fills the cache, the second imports from it
        for p in ("f32", "bf16"):
            warm = open_runtime(path, "openvino", 1, fallback=False, cache=tmp_path, precision=p).run(None, feed)[0]
            assert np.isfinite(warm).all() and float(np.abs(warm - cold[p]).max()) <= 1e-5, p
    folders = {model_cache_folder(tmp_path, path, p) for p in ("f32", "bf16")}
    other = model_cache_folder(tmp_path, exported / "vae_decoder" / "model.onnx", "f32")
    assert len(folders | {other}) == 3 and all(any(f.iterdir()) for f in folders)


def test_repository_records_the_runtimes(tmp_path, monkeypatch) -> None:
    from facetron.export import runtime_choice
    from facetron.export.diffusion_source import DiffusionSource
    from facetron.export.repository import assemble_repository

    # bf16 is a candidate only on a CPU with bf16 kernels: say this one has them, so the bf16 judging runs here too
    # (test_runtime_choice_cache checks the skip on a CPU without them)
    monkeypatch.setattr(runtime_choice, "bf16_fast", lambda: ["avx512_bf16"])

    with pytest.raises(InvalidInputError, match="--cpu-runtime"):
        assemble_repository("cpu", tmp_path / "r0", cpu_runtime="tvm")
    with pytest.raises(InvalidInputError, match="--cpu-runtime: applies to the cpu target only"):
        assemble_repository("gpu", tmp_path / "r0", cpu_runtime="openvino")
    with pytest.raises(InvalidInputError, match="--precision: applies to the cpu target only"):
        assemble_repository("gpu", tmp_path / "r0", precision="bf16")
    with pytest.raises(InvalidInputError, match="--precision: bf16 runs on OpenVINO only"):
        assemble_repository("cpu", tmp_path / "r0", precision="bf16")
    with pytest.raises(InvalidInputError, match="--precision: auto is measured by --cpu-runtime auto"):
        assemble_repository("cpu", tmp_path / "r0", cpu_runtime="openvino", precision="auto")
    nets = ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    repo = assemble_repository("cpu", tmp_path / "auto", models=nets, diffusion=DiffusionSource(lora_rank=8),
                               cpu_runtime="auto", precision="auto")
    choice = json.loads((repo / "runtime_choice.json").read_text())
    assert choice["mode"] == "auto" and set(choice["runtimes"]) == set(nets) and choice["cpu"]["model"]
    for net in nets:
        entry = choice["measurements"][net]
        assert (entry["runtime"], entry["precision"]) == (choice["runtimes"][net], choice["precisions"][net])
        assert entry["reason"] and entry["runtimes"]["onnxruntime"]["p50_ms"] > 0
        assert entry["runtimes"]["openvino"]["eligible"]
        assert entry["runtimes"]["openvino"]["max_abs_vs_onnxruntime"] is not None
        # bf16 is judged against torch's own bf16 deviation on the same inputs (an oracle it did not produce)
        bf16 = entry["runtimes"]["openvino_bf16"]
        assert 0 < entry["torch_bf16_rel_l2"] < 0.2
        if net == "unet":  # every step: judged by a short generation's final latents vs torch bf16's
            image = bf16["image_check"]
            assert 0 < image["torch_bf16_rel_l2"] < 0.5 and image["rel_l2"] > 0
            assert bf16["limit_rel_l2"] == pytest.approx(2 * image["torch_bf16_rel_l2"], rel=1e-3)
            assert bf16["eligible"] == (image["rel_l2"] <= bf16["limit_rel_l2"])
        else:  # once per image: the call
            assert bf16["limit_rel_l2"] == pytest.approx(2 * entry["torch_bf16_rel_l2"], rel=1e-3)
            assert bf16["eligible"] == (bf16["rel_l2_vs_onnxruntime"] <= bf16["limit_rel_l2"])
        config = (repo / net / "config.pbtxt").read_text()
        assert f'key: "runtime"\n  value {{\n    string_value: "{choice["runtimes"][net]}"' in config
        assert f'key: "precision"\n  value {{\n    string_value: "{choice["precisions"][net]}"' in config
        print(net, entry["choice"], entry["reason"], "torch bf16", entry["torch_bf16_rel_l2"],
              "ov bf16", bf16["rel_l2_vs_onnxruntime"], bf16.get("image_check"))


@pytest.mark.slow  # ~25 s (its own server; each net's OpenVINO == ONNX Runtime in process: above): make test-all
@pytest.mark.triton
def test_served_openvino_equals_onnxruntime(base, face_lora, tmp_path) -> None:
    """portrait_generator over a repository whose nets (runtime-LoRA UNet
    included) run in OpenVINO == the same generation with ONNX Runtime nets
    in-process, within 2/255 per pixel (fp32 in both, ~1e-6 apart per call)."""
    from facetron.client import FacetronClient
    from facetron.diffusion.clip_tokenizer import ClipTokenizer
    from facetron.diffusion.nets import DiffusionNets
    from facetron.export.diffusion_source import DiffusionSource
    from facetron.export.repository import assemble_repository
    from facetron.pipeline.generation import generate, read_model_info
    from facetron.pipeline.job import build_job
    from facetron.request import GeneratorRequest
    from facetron.triton.server import TritonServer
    from facetron.users import UserRegistry

    users = tmp_path / "users"
    registry = UserRegistry(users)
    emb = np.random.default_rng(0).standard_normal(128).astype(np.float32)
    registry.save_reference_embedding("ov-user", emb / np.linalg.norm(emb))
    grant(registry, "ov-user")
    registry.install_lora("ov-user", face_lora)
    models = ["tokenizer", "text_encoder", "unet", "vae_decoder", "vae_encoder", "portrait_generator"]
    repo = assemble_repository("cpu", tmp_path / "repo", models=models, diffusion=DiffusionSource(lora_rank=8),
                               users_dir=users, cpu_runtime="openvino")
    assert json.loads((repo / "runtime_choice.json").read_text())["runtimes"]["unet"] == "openvino"
    request = {"user_id": "ov-user", "num_images": 2, "seed": 5, "steps": 4}
    server = TritonServer(repo, log_path=tmp_path / "tritonserver.log", env={"FACETRON_USERS_DIR": str(users)})
    server.start()
    try:
        with FacetronClient(server.grpc_url, timeout_s=120) as client:
            wire = {"user_id": np.array([b"ov-user"], dtype=object), "num_images": np.array([2], np.int32),
                    "seed": np.array([5], np.int64), "steps": np.array([4], np.int32)}
            served = client.infer("portrait_generator", wire, ["images"])["images"]
    finally:
        server.stop()
    log = (tmp_path / "tritonserver.log").read_text(errors="replace")
    assert "OpenVINO could not" not in log and "OpenVINO failed" not in log

    info, sched = read_model_info(repo / "portrait_generator" / "1")
    job = build_job(GeneratorRequest(**request), info, UserRegistry(users))
    net = {m: open_runtime(repo / m / "1" / "model.onnx", "onnxruntime", 1) for m in ("text_encoder", "unet",
                                                                                        "vae_decoder")}
    manifest = read_lora_manifest(repo / "unet" / "1")

    def unet_fn(s, t, h):
        lora = lora_inputs_for(face_lora, manifest, W_FACE, batch=s.shape[0])
        return net["unet"].run(None, {"sample": s, "timestep": t, "encoder_hidden_states": h, **lora})[0]

    te_manifest = read_lora_manifest(repo / "text_encoder" / "1")  # the runtime-LoRA text encoder

    def te_fn(ids):
        lora = lora_inputs_for(face_lora, te_manifest, W_FACE, batch=ids.shape[0])
        return net["text_encoder"].run(None, {"input_ids": ids, **lora})[0]

    nets = DiffusionNets(tokenize=ClipTokenizer(), text_encode=te_fn,
                         unet=unet_fn, vae_decode=lambda lat: net["vae_decoder"].run(None, {"latent": lat})[0],
                         latent_channels=4, latent_factor=8)
    ref = generate(nets, sched, job.prompt, job.negative_prompt, job.sampling)
    assert served.shape == ref.shape == (2, 128, 128, 3)
    diff = np.abs(served.astype(int) - ref.astype(int))
    assert diff.max() <= 2 and diff.mean() <= 0.05, (diff.max(), diff.mean())


def test_runtimes_benchmark_smoke(tmp_path) -> None:
    """benchmarks/runtimes.py on the tiny text encoder: every variant runs and
    reports ms and its deviation from torch; the --full grouping (torch as each
    group's anchor, static OpenVINO variants) runs too. No timing is asserted."""
    pytest.importorskip("nncf")
    from facetron.benchmarks.runtimes import FULL_GROUPS, FULL_INT8_GROUPS, VARIANTS, measure_net, run

    result = run(nets=["text_encoder"], repeats=2, out_dir=tmp_path)
    variants = result["nets"]["text_encoder"]["variants"]
    assert set(variants) == set(VARIANTS) and result["cpu"]["flags"]
    for name, entry in variants.items():
        assert "error" not in entry and entry["ms"] > 0 and entry["rel_l2"] is not None, (name, entry)
    assert variants["openvino_fp32"]["rel_l2"] < 1e-5 and variants["onnxruntime"]["rel_l2"] < 1e-5
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".md", ".png"]
    # what auto would serve, judged by the same rule (bf16 against torch's own bf16, an oracle it did not produce)
    auto = result["nets"]["text_encoder"]["auto_choice"]
    assert auto["choice"] in ("onnxruntime", "openvino_fp32_static", "openvino_bf16_static")
    assert 0 < auto["torch_bf16_rel_l2"] == variants["torch_bf16"]["rel_l2"]
    groups = FULL_GROUPS + FULL_INT8_GROUPS
    grouped = measure_net("text_encoder", repeats=1, groups=groups)
    assert set(grouped["variants"]) == {v for g in groups for v in g}
    assert all("error" not in e and e["ms"] > 0 for e in grouped["variants"].values())
