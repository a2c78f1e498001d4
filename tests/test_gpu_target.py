"""gpu target, merged mode: each user's ``unet_user_<id>`` as a native Triton
model — a ``tensorrt_plan`` (built, or refitted from the repository's
refit-enabled engine) where TensorRT imports, else ``onnxruntime_onnx`` with
ORT's TensorRT accelerator — and ``facetron export refit``.

On this machine TensorRT does not import: the ORT variant is written and
checked against its ONNX graph as Triton's onnxruntime backend checks it; the
plan variant's plumbing (file layout, config, profile, records) is checked
with a stand-in for TensorRT that builds nothing (its "engines" are
placeholder bytes, never loaded). Real engines: the last test, where
TensorRT builds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from facetron import contract
from facetron.errors import InvalidInputError
from facetron.export import trt
from facetron.export.model_configs import (BY_NAME, TRT_ENGINE_CACHE_ROOT, config_graph_problems, merged_unet_def,
                                           render, with_graph_dims)
from facetron.users import UserRegistry
from user_tokens import grant  # noqa: E402

_ORT_TYPES = {"tensor(uint8)": "UINT8", "tensor(float)": "FP32", "tensor(int32)": "INT32", "tensor(int64)": "INT64"}
PLACEHOLDER = b"placeholder written by a test stand-in for TensorRT: not an engine\n"


def _parse(path: Path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def onnx_io(onnx_path: Path):
    """(inputs, outputs) of the ONNX graph as ONNX Runtime reads it: (name, Triton dtype, shape; -1 = dynamic)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return [[(t.name, _ORT_TYPES[t.type], [d if isinstance(d, int) else -1 for d in t.shape]) for t in ios]
            for ios in (sess.get_inputs(), sess.get_outputs())]


def _shapes(text: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(int(x) for x in v.split("x")) for k, v in (item.split(":") for item in text.split(","))}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A gpu repository of the tiny default model + a user registry with four users' face LoRAs."""
    from facetron.diffusion.base_model import load_base_model
    from facetron.export.diffusion_source import DiffusionSource
    from facetron.export.repository import assemble_repository
    from facetron.training.random_lora import write_random_lora

    work = tmp_path_factory.mktemp("gpu_target")
    repo = assemble_repository("gpu", work / "repo", diffusion=DiffusionSource(), identity_mode="merged")
    registry = UserRegistry(work / "users")
    unet = load_base_model().unet
    for i, user in enumerate(("ana", "ben", "cy", "dee")):
        registry.save_reference_embedding(user, np.ones((1, 128), np.float32))
        grant(registry, user)
        registry.install_lora(user, write_random_lora(work / f"{user}.safetensors", unet, rank=4, alpha=4, seed=60 + i,
                                                      std=0.1))
    info = json.loads((repo / "portrait_generator" / "1" / "model_info.json").read_text())
    return SimpleNamespace(repo=repo, users=registry.root, native=info["resolution"], factor=info["latent_factor"])


def _check_served_sides(shapes: dict, native: int, factor: int, max_batch: int) -> None:
    """The profile covers batch 1..max_batch and every side a request may ask for, tuned at native (batch 2)."""
    lo, opt, hi = shapes["sample"]
    assert (lo[0], opt[0], hi[0]) == (1, 2, max_batch)
    assert lo[2:] == (contract.MIN_LATENT_SIDE,) * 2 and opt[2:] == (native // factor,) * 2
    assert hi[2:] == (int(contract.MAX_SIDE_FACTOR * native) // factor,) * 2
    assert [s[0] for s in shapes["timestep"]] == [1, 2, max_batch]


@pytest.mark.skipif(trt.engine_build_unavailable_reason() is None, reason="TensorRT builds here: the plan is written")
def test_merged_user_gpu_without_tensorrt_is_ort_with_the_trt_accelerator(setup, capsys) -> None:
    from facetron.export.repository import add_merged_user

    model = add_merged_user(setup.repo, "ana", setup.users, target="gpu")
    lines = capsys.readouterr().out.splitlines()
    (said,) = [line for line in lines if line.startswith("[export] unet_user_ana:")]
    assert "onnxruntime_onnx with ORT's TensorRT accelerator" in said and "TensorRT not available here: " in said
    version = model / "1"
    assert {p.name for p in version.iterdir()} >= {"model.onnx", "io.json", contract.MERGE_INFO}
    assert not (version / "model.py").exists() and not (version / "model.plan").exists()
    assert json.loads((version / contract.MERGE_INFO).read_text())["user_version"]  # ensure_merged_unet's check
    cfg = _parse(model / "config.pbtxt")
    assert cfg.name == "unet_user_ana" and cfg.platform == "onnxruntime_onnx" and not cfg.backend
    assert cfg.default_model_filename == "model.onnx" and cfg.max_batch_size == 32 and not cfg.parameters
    assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    (acc,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert acc.name == "tensorrt" and acc.parameters["precision_mode"] == "FP16"
    assert acc.parameters["trt_engine_cache_enable"] == "1"
    assert acc.parameters["trt_engine_cache_path"] == f"{TRT_ENGINE_CACHE_ROOT}/unet_user_ana"
    # the per-item timestep [1] reaches the graph as its [N]; channels and hidden size are the graph's
    by_name = {t.name: t for t in cfg.input}
    assert by_name["timestep"].HasField("reshape") and list(by_name["timestep"].reshape.shape) == []
    assert list(by_name["sample"].dims)[0] > 0 and list(by_name["encoder_hidden_states"].dims)[1] > 0
    # the structural checks: config == the ONNX graph as Triton's onnxruntime backend compares them
    graph = onnx_io(version / "model.onnx")
    assert config_graph_problems(cfg, *graph) == []
    # ORT's TensorRT profile: all inputs, batch 1..max_batch_size, every served side
    profile = {k: _shapes(acc.parameters[f"trt_profile_{k}_shapes"]) for k in ("min", "opt", "max")}
    shapes = {name: tuple(profile[k][name] for k in ("min", "opt", "max")) for name in profile["min"]}
    assert trt.profile_problems(cfg, shapes) == []
    _check_served_sides(shapes, setup.native, setup.factor, cfg.max_batch_size)
    # the graph runs at the profile's smallest and the served native shapes, fed as the backend feeds it
    import onnxruntime as ort

    sess = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    for which in (0, 1):
        rng = np.random.default_rng(which)
        feed = {name: rng.standard_normal(s[which]).astype(np.float32) for name, s in shapes.items()}
        (out,) = sess.run(None, feed)
        assert out.shape == shapes["sample"][which] and np.isfinite(out).all()


@pytest.fixture()
def fake_tensorrt(monkeypatch):
    """TensorRT "imports" (a namespace with a version) and "builds": the plumbing that decides files and
    configs runs; build_engine / refit_engine are stand-ins that record their arguments and write placeholder
    bytes. Nothing here is an engine or claims to be one."""
    calls = SimpleNamespace(builds=[], refits=[], version="0.0.0-test-stand-in")

    def build_engine(onnx_path, engine_path, shapes, *, fp16=True, refit=False, workspace_mib=8192):
        calls.builds.append(dict(onnx=onnx_io(Path(onnx_path)), engine=Path(engine_path), shapes=shapes, fp16=fp16,
                                 refit=refit))
        Path(engine_path).parent.mkdir(parents=True, exist_ok=True)
        Path(engine_path).write_bytes(PLACEHOLDER)
        return Path(engine_path)

    def refit_engine(engine_path, merged_onnx, out_path=None):
        calls.refits.append(dict(template=Path(engine_path), onnx=Path(merged_onnx), out=Path(out_path)))
        shutil.copyfile(engine_path, out_path)
        return {"engine": str(out_path), "weights_set": 1, "seconds": 0.0}

    monkeypatch.setattr(trt, "engine_build_unavailable_reason", lambda: None)
    monkeypatch.setattr(trt, "import_tensorrt", lambda: SimpleNamespace(__version__=calls.version))
    monkeypatch.setattr(trt, "build_engine", build_engine)
    monkeypatch.setattr(trt, "refit_engine", refit_engine)
    return calls


def test_merged_user_gpu_plan_plumbing(setup, fake_tensorrt, capsys) -> None:
    """Where TensorRT builds: ``unet_user_<id>`` is a tensorrt_plan whose config equals the plan variant of
    the merged UNet, whose tensors equal the ONNX graph the engine is built from, and whose one fp16 profile
    covers the config's dims and every served side; trt_build.json names the TensorRT version and GPU."""
    from facetron.export.repository import add_merged_user

    model = add_merged_user(setup.repo, "ben", setup.users, target="gpu")
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[export] unet_user_ben:")]
    assert len(said) == 1 and "tensorrt_plan, fp16 model.plan built in" in said[0]
    (build,) = fake_tensorrt.builds
    # built inside the model's temp folder, renamed into place when complete
    assert build["engine"].parts[-2:] == ("1", "model.plan") and build["engine"].parts[-3].startswith(".unet_user_ben.")
    assert build["fp16"] and not build["refit"]
    version = model / "1"
    assert {p.name for p in version.iterdir()} == {"model.plan", "trt_build.json", "io.json", contract.MERGE_INFO}
    assert (version / "model.plan").read_bytes() == PLACEHOLDER  # the stand-in's bytes: no engine was built
    cfg = _parse(model / "config.pbtxt")
    assert cfg.platform == "tensorrt_plan" and cfg.default_model_filename == "model.plan" and not cfg.parameters
    assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU and cfg.max_batch_size == 32
    assert not cfg.optimization.execution_accelerators.gpu_execution_accelerator
    from facetron.export.onnx_graph import read_io

    inputs, outputs, _ = read_io(version)
    assert (model / "config.pbtxt").read_text() == render(with_graph_dims(merged_unet_def("ben", tensorrt=True),
                                                                          inputs, outputs), "gpu")
    assert config_graph_problems(cfg, *build["onnx"]) == []  # the graph TensorRT parsed
    assert trt.profile_problems(cfg, build["shapes"]) == []
    _check_served_sides(build["shapes"], setup.native, setup.factor, cfg.max_batch_size)
    record = json.loads((version / "trt_build.json").read_text())
    assert record["tensorrt"] == fake_tensorrt.version and record["fp16"] and record["refit"] is False
    assert set(record) >= {"gpu", "compute_capability", "profile", "build_seconds"}
    assert record["profile"] == {k: [list(s) for s in v] for k, v in build["shapes"].items()}


def test_refit_plumbing(setup, fake_tensorrt, capsys) -> None:
    """``refit``: the first user builds the repository's refit-enabled engine (at its root, beside the
    models: Triton ignores files there) and refits a copy; later users only refit; another TensorRT
    version rebuilds it; a template file facetron did not record is refused, never replaced."""
    from facetron.export.repository import add_merged_user

    repo = setup.repo
    for f in (trt.REFIT_TEMPLATE, trt.REFIT_TEMPLATE_RECORD):
        (repo / f).unlink(missing_ok=True)
    first = add_merged_user(repo, "cy", setup.users, target="gpu", refit=True)
    (build,) = fake_tensorrt.builds
    assert build["engine"] == repo / trt.REFIT_TEMPLATE and build["refit"] and build["fp16"]
    (refit,) = fake_tensorrt.refits
    assert refit["template"] == repo / trt.REFIT_TEMPLATE and refit["out"].name == "model.plan"
    template = json.loads((repo / trt.REFIT_TEMPLATE_RECORD).read_text())
    assert template["made_by"] == "facetron export refit" and template["tensorrt"] == fake_tensorrt.version
    record = json.loads((first / "1" / "trt_build.json").read_text())
    assert record["refitted_from"] == trt.REFIT_TEMPLATE and record["template_built_seconds"] is not None
    assert record["graph"] == template["graph"] and record["refit"] is True
    assert _parse(first / "config.pbtxt").platform == "tensorrt_plan"
    assert "refitted in" in capsys.readouterr().out

    second = add_merged_user(repo, "dee", setup.users, target="gpu", refit=True)  # a refit only
    assert len(fake_tensorrt.builds) == 1 and len(fake_tensorrt.refits) == 2
    assert json.loads((second / "1" / "trt_build.json").read_text())["template_built_seconds"] is None
    assert (repo / "unet_user_cy" / "1" / "model.plan").is_file()  # the first user untouched

    fake_tensorrt.version = "0.0.1-test-stand-in"  # another TensorRT: its engines differ
    add_merged_user(repo, "dee", setup.users, target="gpu", refit=True)
    assert len(fake_tensorrt.builds) == 2

    (repo / trt.REFIT_TEMPLATE_RECORD).unlink()  # now a template facetron has no record of
    with pytest.raises(InvalidInputError, match=f"{trt.REFIT_TEMPLATE}: exists without the "
                                                 f"{trt.REFIT_TEMPLATE_RECORD}"):
        add_merged_user(repo, "ana", setup.users, target="gpu", refit=True)
    assert (repo / trt.REFIT_TEMPLATE).read_bytes() == PLACEHOLDER
    (repo / trt.REFIT_TEMPLATE).unlink()


@pytest.mark.skipif(trt.engine_build_unavailable_reason() is None, reason="TensorRT builds here: the plan is refitted")
def test_cli_refit_without_tensorrt_writes_the_ort_variant(setup, capsys) -> None:
    from facetron.cli import main

    code = main(["export", "refit", "--repo", str(setup.repo), "--user", "dee", "--users-dir", str(setup.users)])
    out = capsys.readouterr().out
    assert code == 0, out
    (said,) = [line for line in out.splitlines() if line.startswith("[export] unet_user_dee:")]
    assert said.startswith("[export] unet_user_dee: no refit: onnxruntime_onnx with ORT's TensorRT accelerator")
    assert "TensorRT not available here: " in said
    assert "[export refit] merged UNet of 'dee' -> " in out
    cfg = _parse(setup.repo / "unet_user_dee" / "config.pbtxt")
    assert cfg.platform == "onnxruntime_onnx"
    assert config_graph_problems(cfg, *onnx_io(setup.repo / "unet_user_dee" / "1" / "model.onnx")) == []
    assert not (setup.repo / trt.REFIT_TEMPLATE).exists()


def test_cli_refit_refuses_unknown_user_missing_or_cpu_repository(setup, tmp_path, capsys) -> None:
    from facetron.cli import main

    before = sorted(p.name for p in setup.repo.iterdir())
    assert main(["export", "refit", "--repo", str(setup.repo), "--user", "nobody-here",
                 "--users-dir", str(setup.users)]) == 2
    err = capsys.readouterr().err
    assert "--user: no trained LoRA for user 'nobody-here'" in err, err
    assert sorted(p.name for p in setup.repo.iterdir()) == before

    missing = tmp_path / "no-repo"
    assert main(["export", "refit", "--repo", str(missing), "--user", "ana", "--users-dir", str(setup.users)]) == 2
    err = capsys.readouterr().err
    assert f"{missing}: is not an assembled facetron repository" in err, err
    assert not missing.exists()

    assert main(["export", "refit", "--repo", str(setup.repo), "--user", "bad/id"]) == 2
    assert "--user: 'bad/id' is not a valid user id" in capsys.readouterr().err

    cpu = tmp_path / "cpu-repo"  # a cpu repository: its vae_decoder runs on KIND_CPU
    for name in ("portrait_generator", "vae_decoder"):
        (cpu / name).mkdir(parents=True)
        (cpu / name / "config.pbtxt").write_text(render(BY_NAME.get(name) or _diffusion(name), "cpu"))
    assert main(["export", "refit", "--repo", str(cpu), "--user", "ana", "--users-dir", str(setup.users)]) == 2
    err = capsys.readouterr().err
    assert f"--target: {cpu} is a cpu repository" in err, err
    assert sorted(p.name for p in cpu.iterdir()) == ["portrait_generator", "vae_decoder"]

    # the base model defaults to the repository's own (a refit of another base would serve the wrong UNet)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(setup.repo / "portrait_generator", elsewhere / "portrait_generator")
    info_path = elsewhere / "portrait_generator" / "1" / "model_info.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "is_smoke_model": False, "path": str(tmp_path / "sd15-not-here")}))
    assert main(["export", "refit", "--repo", str(elsewhere), "--user", "ana", "--users-dir", str(setup.users)]) == 2
    err = capsys.readouterr().err
    assert f"--base-model: {elsewhere} was assembled from {tmp_path / 'sd15-not-here'}" in err, err


def _diffusion(name: str):
    from facetron.export.model_configs import DIFFUSION_MODELS

    return next(m for m in DIFFUSION_MODELS if m.name == name)


def test_with_graph_dims_refuses_a_contradicting_graph() -> None:
    from facetron.export.onnx_graph import TensorSpec

    model = merged_unet_def("ana")
    inputs = [TensorSpec("sample", "FP32", ("N", 4, "h", "w")), TensorSpec("timestep", "FP32", ("N",)),
              TensorSpec("encoder_hidden_states", "FP32", ("N", 7, 768))]
    outputs = [TensorSpec("noise_pred", "FP32", ("N", 4, "h", "w"))]
    with pytest.raises(ValueError, match="'encoder_hidden_states' is \\[77, -1\\] in the contract"):
        with_graph_dims(model, inputs, outputs)
    with pytest.raises(ValueError, match="not served by a native backend"):
        with_graph_dims(BY_NAME["tokenizer"], inputs, outputs)


# ----------------------------------------------------------------------------- real TensorRT (GPU hosts)


@pytest.mark.skipif(trt.engine_build_unavailable_reason() is not None,
                    reason=str(trt.engine_build_unavailable_reason()))
def test_merged_user_plan_built_and_refitted_where_tensorrt_builds(setup, tmp_path) -> None:
    from facetron.export.repository import add_merged_user

    repo = tmp_path / "repo"
    shutil.copytree(setup.repo, repo, ignore=shutil.ignore_patterns("unet_user_*", "unet_refit.*"))
    built = add_merged_user(repo, "ana", setup.users, target="gpu")
    refitted = add_merged_user(repo, "ben", setup.users, target="gpu", refit=True)
    for model in (built, refitted):
        record = json.loads((model / "1" / "trt_build.json").read_text())
        assert record["tensorrt"] == trt.import_tensorrt().__version__ and record["gpu"]
        assert (model / "1" / "model.plan").read_bytes() != PLACEHOLDER
        assert _parse(model / "config.pbtxt").platform == "tensorrt_plan"
    assert json.loads((refitted / "1" / "trt_build.json").read_text())["weights_set"] > 0
