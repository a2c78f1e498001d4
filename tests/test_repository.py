"""Repository assembly: one config source, cpu target loads READY in the real
server, gpu target configs parse and match their ONNX artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from facetron import contract
from facetron.errors import InvalidInputError
from facetron.export import repository
from facetron.export.model_configs import MODELS, TARGETS, models_for, render
from facetron.export.controlnet import CONTROLNET_MODEL
from facetron.export.repository import SOURCE_REPOSITORY, assemble_repository, source_models

_ORT_TYPES = {"tensor(uint8)": "UINT8", "tensor(float)": "FP32", "tensor(int32)": "INT32", "tensor(int64)": "INT64"}


def _parse(text: str):
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def _with_every_option(target: str) -> list:
    """The models of a ``target`` repository assembled with every option the session repository has
    (tests/conftest.py: --tiny-vae, --distill-lora, --controlnet)."""
    return [*models_for(target, diffusion=True, tiny_vae=True, fewstep=True), CONTROLNET_MODEL]


@pytest.mark.parametrize("target", TARGETS)
def test_every_config_parses(target: str) -> None:
    for model in _with_every_option(target):
        cfg = _parse(render(model, target))
        assert cfg.name == model.name
        # every model has a bounded queue; the batching nets also wait a moment to batch
        policy = cfg.dynamic_batching.default_queue_policy
        assert policy.max_queue_size > 0 and policy.default_timeout_microseconds > 0, model.name
        assert (cfg.max_batch_size > 0) == (cfg.dynamic_batching.max_queue_delay_microseconds > 0), model.name


def test_checked_in_configs_match_the_source() -> None:
    for model in source_models():
        checked_in = (SOURCE_REPOSITORY / model.name / "config.pbtxt").read_text()
        assert checked_in == render(model, "cpu"), f"{model.name}: run write_source_configs()"
    names = {p.name for p in SOURCE_REPOSITORY.iterdir() if p.is_dir()}
    # unet_user is the code of every per-user merged UNet (serving mode 1), not a model of its own
    assert names == {m.name for m in source_models()} | {contract.MERGED_UNET_SOURCE}
    assert {m.name for m in models_for("cpu", diffusion=True, tiny_vae=True)} < names


def test_the_controlnet_is_served_only_when_given_like_the_unet() -> None:
    """controlnet (--controlnet): the unet's batch size, queue and dynamic-batching delay; its outputs are the
    unet's optional residual inputs, name for name; a net's parameters (its runtime follows the unet's)."""
    assert CONTROLNET_MODEL.name not in {m.name for m in models_for("cpu", diffusion=True, tiny_vae=True)}
    unet = {m.name: m for m in models_for("cpu", diffusion=True)}["unet"]
    assert (CONTROLNET_MODEL.max_batch_size, CONTROLNET_MODEL.queue, CONTROLNET_MODEL.queue_delay_us) == (
        unet.max_batch_size, unet.queue, unet.queue_delay_us)
    residuals = {t.name: t for t in unet.inputs if t.name in CONTROLNET_MODEL.contract.output_names()}
    assert list(residuals) == list(CONTROLNET_MODEL.contract.output_names())
    assert len(residuals) == contract.MAX_CONTROL_RESIDUALS + 1 and all(t.optional for t in residuals.values())
    assert CONTROLNET_MODEL.contract.params is contract.NetParams
    assert CONTROLNET_MODEL.gpu.parameters["providers"] == "cuda" and CONTROLNET_MODEL.gpu.backend == "python"


def test_the_tiny_autoencoder_is_served_only_when_given() -> None:
    """vae_decoder_tiny / vae_encoder_tiny: only in a repository assembled with --tiny-vae, with the full VAEs'
    tensors, batch size and parameters."""
    tiny = {m.name for m in models_for("cpu", diffusion=True, tiny_vae=True)} - {
        m.name for m in models_for("cpu", diffusion=True)}
    assert tiny == {contract.VAE_DECODER_TINY.name, contract.VAE_ENCODER_TINY.name}
    assert not tiny & {m.name for m in models_for("cpu", tiny_vae=True)}  # no diffusion, no autoencoder
    for full, small in ((contract.VAE_DECODER, contract.VAE_DECODER_TINY), (contract.VAE_ENCODER, contract.VAE_ENCODER_TINY)):
        assert (small.inputs, small.outputs, small.max_batch_size, small.params) == (
            full.inputs, full.outputs, full.max_batch_size, full.params)


def test_the_fewstep_unet_is_served_only_when_given_like_the_unet() -> None:
    """unet_fewstep (--distill-lora): only with the diffusion models and the flag; the unet's contract (tensors,
    batch size, parameters), queue, batching delay and python code; on gpu the same LoRA-bank model on CUDA."""
    fewstep = {m.name for m in models_for("cpu", diffusion=True, fewstep=True)} - {
        m.name for m in models_for("cpu", diffusion=True, tiny_vae=True)}
    assert fewstep == {contract.UNET_FEWSTEP.name}
    assert contract.UNET_FEWSTEP.name not in {m.name for m in models_for("cpu", fewstep=True)}
    unet, few = ({m.name: m for m in models_for("cpu", diffusion=True, fewstep=True)}[n]
                 for n in (contract.UNET.name, contract.UNET_FEWSTEP.name))
    assert (few.inputs, few.outputs, few.max_batch_size, few.contract.params) == (
        unet.inputs, unet.outputs, unet.max_batch_size, unet.contract.params)
    assert (few.queue, few.queue_delay_us, few.source) == (unet.queue, unet.queue_delay_us, contract.UNET.name)
    for target in TARGETS:
        a, b = _parse(render(unet, target)), _parse(render(few, target))
        assert b.name == contract.UNET_FEWSTEP.name and b.backend == "python"
        b.name = a.name
        assert a == b, target
    assert not (SOURCE_REPOSITORY / contract.UNET_FEWSTEP.name / "1").exists()  # its code is model_repository/unet


def test_nets_batch_set_models_do_not() -> None:
    by = {m.name: m for m in MODELS}
    assert by["face_detector"].max_batch_size > 0 and by["face_embedder"].max_batch_size > 0
    assert by["face_select"].max_batch_size == 0


@pytest.fixture(scope="module")
def gpu_repo(tmp_path_factory, tiny_vae_dir, controlnet_dir) -> Path:
    """The gpu target with the tiny autoencoder and a ControlNet too (the session's small random ones: no weights
    ship)."""
    from facetron.export.diffusion_source import DiffusionSource

    return assemble_repository("gpu", tmp_path_factory.mktemp("gpu") / "model_repository",
                               diffusion=DiffusionSource(tiny_vae=tiny_vae_dir, controlnet=controlnet_dir))


def test_gpu_repository_uses_native_backends(gpu_repo: Path) -> None:
    emb = _parse((gpu_repo / "face_embedder" / "config.pbtxt").read_text())
    assert emb.platform == "onnxruntime_onnx" and emb.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert emb.optimization.execution_accelerators.gpu_execution_accelerator[0].name == "tensorrt"
    det = _parse((gpu_repo / "face_detector" / "config.pbtxt").read_text())
    assert det.backend == "python" and det.parameters["nets"].string_value == "bls"
    for net in ("mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet", "face_embedder", "text_encoder", "vae_decoder", "unet"):
        assert (gpu_repo / net / "1" / "model.onnx").is_file(), net
    for name in ("unet", "text_encoder", "controlnet"):  # the runtime-LoRA nets (their LoRA bank) and the
        cfg = _parse((gpu_repo / name / "config.pbtxt").read_text())  # ControlNet feeding the unet: python on CUDA
        assert cfg.backend == "python" and cfg.parameters["providers"].string_value == "cuda", name
    for graph in ("controlnet/1", f"unet/1/{contract.CONTROL_FOLDER}"):  # the ControlNet and the unet taking it
        assert (gpu_repo / graph / contract.MODEL_FILE).is_file() and (gpu_repo / graph / contract.CONTROL_LAYOUT).is_file()


def test_gpu_onnx_artifacts_match_their_configs(gpu_repo: Path) -> None:
    """Names, dtypes and ranks of each ONNX graph equal its config's contract."""
    for name in ("mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet", "face_embedder", "vae_decoder", "vae_encoder",
                 "vae_decoder_tiny", "vae_encoder_tiny"):
        cfg = _parse((gpu_repo / name / "config.pbtxt").read_text())
        if cfg.platform == "tensorrt_plan":  # TensorRT imported at assembly: test_gpu_tensorrt_plan_entries
            continue
        assert cfg.platform == "onnxruntime_onnx", name
        _check_config_against_onnx(name, cfg, gpu_repo / name / "1" / "model.onnx")


@pytest.mark.parametrize("name", ["vae_decoder", "vae_encoder", "vae_decoder_tiny", "vae_encoder_tiny"])
def test_gpu_vae_ort_configs_fix_the_graph_dims(gpu_repo: Path, name: str) -> None:
    cfg = _parse((gpu_repo / name / "config.pbtxt").read_text())
    if cfg.platform == "tensorrt_plan":
        pytest.skip("TensorRT imported at assembly: the plan variant (its backend accepts -1)")
    _check_config_against_onnx(name, cfg, gpu_repo / name / "1" / "model.onnx")


def test_with_graph_dims_gives_vae_configs_the_onnxruntime_backend_loads(gpu_repo: Path) -> None:
    """What the assembly does for the test above: the contract's -1 dims the graph fixes become the graph's."""
    from facetron.export.model_configs import BY_NAME, with_graph_dims
    from facetron.export.onnx_graph import read_io

    for name in ("vae_decoder", "vae_encoder"):
        onnx_dir = gpu_repo / name / "1"
        if not (onnx_dir / "model.onnx").is_file():
            continue  # TensorRT imported at assembly
        inputs, outputs, _ = read_io(onnx_dir)
        cfg = _parse(render(with_graph_dims(BY_NAME[name], inputs, outputs), "gpu"))
        assert cfg.platform == "onnxruntime_onnx"
        assert len(cfg.optimization.execution_accelerators.gpu_execution_accelerator) == 1
        _check_config_against_onnx(name, cfg, onnx_dir / "model.onnx")


def _onnx_io(onnx_path: Path):
    """(inputs, outputs) of an ONNX graph as ONNX Runtime reads it: (name, Triton dtype, shape; -1 = dynamic)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return [[(t.name, _ORT_TYPES[t.type], [d if isinstance(d, int) else -1 for d in t.shape]) for t in ios]
            for ios in (sess.get_inputs(), sess.get_outputs())]


def _check_config_against_onnx(name: str, cfg, onnx_path: Path, allow_wildcards: bool | None = None) -> None:
    """Input/output names, dtypes and shapes of ``cfg`` == the ONNX graph's (batch dim, reshape), each
    fixed graph dim as Triton's backend for ``cfg.platform`` checks it (``config_graph_problems``)."""
    from facetron.export.model_configs import config_graph_problems

    assert config_graph_problems(cfg, *_onnx_io(onnx_path), allow_wildcards=allow_wildcards) == [], name


def test_gpu_tensorrt_plan_entries(gpu_repo: Path) -> None:
    """The VAEs as ``tensorrt_plan`` models: written where
    TensorRT imports at assembly (a built ``model.plan`` + its build record),
    else the ORT variant with the TensorRT accelerator and an engine cache.
    Either way the plan configs are valid Triton configs whose tensors equal
    the ONNX graphs the plans are built from, and the one profile they are
    built with covers the config (structural check here)."""
    from facetron.export.model_configs import BY_NAME, TENSORRT_NETS, TRT_ENGINE_CACHE_ROOT, with_tensorrt_plan
    from facetron.export.onnx_graph import read_io
    from facetron.export.trt import profile_problems, profile_shapes, served_profile_sizes, tensorrt_unavailable_reason

    info = json.loads((gpu_repo / "portrait_generator" / "1" / "model_info.json").read_text())

    for name in TENSORRT_NETS:
        plan_cfg = _parse(render(with_tensorrt_plan(BY_NAME[name]), "gpu"))
        assert plan_cfg.platform == "tensorrt_plan" and plan_cfg.default_model_filename == "model.plan", name
        assert plan_cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
        assert plan_cfg.max_batch_size == BY_NAME[name].max_batch_size and not plan_cfg.parameters
        served = _parse((gpu_repo / name / "config.pbtxt").read_text())
        if tensorrt_unavailable_reason() is None:
            assert served == plan_cfg, name
            assert (gpu_repo / name / "1" / "model.plan").stat().st_size > 0
            assert json.loads((gpu_repo / name / "1" / "trt_build.json").read_text())["tensorrt"]
            continue
        assert served.platform == "onnxruntime_onnx", name
        (acc,) = served.optimization.execution_accelerators.gpu_execution_accelerator
        assert acc.name == "tensorrt" and acc.parameters["precision_mode"] == "FP16"
        assert acc.parameters["trt_engine_cache_enable"] == "1"
        assert acc.parameters["trt_engine_cache_path"] == f"{TRT_ENGINE_CACHE_ROOT}/{name}"
        # the plan config against the ONNX graph a plan would be built from, and the profile it would be built with
        _check_config_against_onnx(name, plan_cfg, gpu_repo / name / "1" / "model.onnx")
        inputs, _, _ = read_io(gpu_repo / name / "1")
        sizes = served_profile_sizes(plan_cfg.max_batch_size, info["resolution"], info["latent_factor"])
        assert profile_problems(plan_cfg, profile_shapes(inputs, sizes)) == [], name
    with pytest.raises(ValueError, match="no TensorRT plan variant"):
        with_tensorrt_plan(BY_NAME["unet"])


@pytest.mark.triton
def test_full_cpu_repository_is_ready(client, full_repository: Path) -> None:
    """The session server serves the assembled repository with every cpu model, the optional ones too."""
    for model in _with_every_option("cpu"):
        assert client.model_ready(model.name), model.name
    for name in contract.RUNTIME_LORA_UNETS + ("text_encoder",):  # the runtime-LoRA graphs
        assert (full_repository / name / "1" / "lora_manifest.json").is_file(), name
    assert (full_repository / "portrait_generator" / "1" / "model_info.json").is_file()


def test_the_session_repository_follows_the_table(full_repository: Path) -> None:
    """The assembled repository (every option) holds exactly the table's models; each config equals its ModelDef's
    rendering but for the parameters assembly sets (runtime, precision, users_dir, ...); each net's graph agrees
    with its config: every required input is a graph input, every graph output a config output, and a tensor in
    both has one dtype and rank (the batch dim included; a per-item value [N, 1] may be [N] in the graph, the
    python model reshapes it) and no fixed dim that differs."""
    models = {m.name: m for m in _with_every_option("cpu")}
    assert {p.name for p in full_repository.iterdir() if (p / "config.pbtxt").is_file()} == set(models)
    for name, model in models.items():
        served, table = _parse((full_repository / name / "config.pbtxt").read_text()), _parse(render(model, "cpu"))
        served.ClearField("parameters")
        table.ClearField("parameters")
        assert served == table, name
        graph = full_repository / name / "1" / contract.MODEL_FILE
        if not graph.is_file():  # the python models that run no graph of their own
            continue
        cfg = _parse(render(model, "cpu"))
        graph_inputs, graph_outputs = (dict((n, (t, s)) for n, t, s in io) for io in _onnx_io(graph))
        required = {t.name for t in cfg.input if not t.optional}
        assert required <= set(graph_inputs), (name, required - set(graph_inputs))
        assert set(graph_outputs) <= {t.name for t in cfg.output}, name
        for t in [*cfg.input, *cfg.output]:
            found = graph_inputs.get(t.name) or graph_outputs.get(t.name)
            if found is None:
                continue
            dtype, shape = found
            want = [-1] * (cfg.max_batch_size > 0) + list(t.dims)
            if want == [-1, 1] and shape == [-1]:  # one value per batch item: [N, 1] on the wire, [N] in the graph
                want = [-1]
            assert f"TYPE_{dtype}" == model_config_pb2.DataType.Name(t.data_type), (name, t.name)
            assert len(shape) == len(want), (name, t.name, shape, want)
            assert all(g == -1 or c == -1 or g == c for g, c in zip(shape, want)), (name, t.name, shape, want)


@pytest.mark.triton
def test_cpu_repository_loads_ready(tmp_path: Path) -> None:
    from facetron.client import FacetronClient
    from facetron.triton.server import TritonServer

    repo = assemble_repository("cpu", tmp_path / "model_repository")
    with TritonServer(repo, log_path=tmp_path / "log.txt") as server, FacetronClient(server.grpc_url) as client:
        for model in models_for("cpu"):
            assert client.model_ready(model.name), model.name
        ids = client.tokenize(["a photo of a man"])
        assert ids[0, :3].tolist() == [49406, 320, 1125]


def test_detector_accepts_external_runners() -> None:
    """The gpu target's BLS path: the cascade with nets supplied from outside."""
    import onnxruntime as ort

    from face_photos import photo
    from facetron.faces.detector import FaceDetector, mtcnn_onnx_paths

    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in mtcnn_onnx_paths().values()]
    runners = tuple((lambda x, s=s: s.run(None, {"images": x})) for s in sessions)
    img = photo("t1")
    ours = FaceDetector(runners=runners).detect(img)
    ref = FaceDetector().detect(img)
    np.testing.assert_allclose(ours.boxes, ref.boxes, atol=1e-3)


def test_bad_target_and_model(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="--target"):
        assemble_repository("tpu", tmp_path / "r")
    with pytest.raises(InvalidInputError, match="not served on target cpu"):
        assemble_repository("cpu", tmp_path / "r", models=["mtcnn_pnet"])


def test_interrupted_build_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    def boom(dest: Path) -> None:
        raise RuntimeError("export killed")

    monkeypatch.setitem(repository.ARTIFACT_BUILDERS, "face_embedder", boom)
    with pytest.raises(RuntimeError):
        assemble_repository("gpu", tmp_path / "model_repository")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [
    ["export", "repository", "--faces-only", "--out", "{dir}"],
    ["train", "prepare", "{dir}", "--user", "someone", "--out", "{dir}"],
    ["train", "prepare", "{dir}", "--user", "someone", "--out", "{dir}/prepared"],
])
def test_out_with_foreign_files_is_refused_and_left_intact(tmp_path: Path, capsys, argv) -> None:
    """`--out` pointing at a user's folder: a clear error, the files intact."""
    from facetron.cli import main

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "sentinel.txt").write_text("keep me")
    code = main([a.format(dir=folder) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and ("did not make" in err or "never writes into its input" in err) and str(folder) in err, err
    assert [p.name for p in folder.iterdir()] == ["sentinel.txt"]
    assert (folder / "sentinel.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]
