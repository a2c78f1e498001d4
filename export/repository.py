"""Assemble a servable Triton model repository for a target (cpu | gpu).

Configs come from :mod:`facetron.export.model_configs` (one source of truth);
python models' code comes from the checked-in ``model_repository/`` (whose
``config.pbtxt`` files are the cpu rendering of the same source — a test
keeps them equal); net artifacts (ONNX) are exported into the version
folders for targets that serve nets natively. The repository is built in a
temp folder and renamed into place: an interrupted build leaves no
half-written repository.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Mapping

from facetron.atomic import atomic_dir, atomic_write_json, owned_folder, remove_tree
from facetron.contract import (DEFAULT_NET_RUNTIME, DEFAULT_STYLE_WEIGHT, DEFAULT_W_FACE, IDENTITY_MODES,
                               MODEL_FILE, NET_RUNTIMES, VERSION_FOLDER, merged_unet_name)
from facetron.contract import UNET, UNET_FEWSTEP
from facetron.diffusion.base_model import load_base_model
from facetron.errors import InvalidInputError, NotFoundError
from facetron.export.lora_files import load_lora
from facetron.export.merge import MERGE_INFO, lora_plan, merge_loras, merge_provenance
from facetron.export.model_configs import (TENSORRT_NETS, TRT_ENGINE_CACHE_ROOT, ModelDef, Target, TARGETS,
                                           merged_unet_def, models_for, render, with_graph_dims,
                                           with_tensorrt_plan)
from facetron.export.controlnet import CONTROLNET_MODEL
from facetron.export.diffusion_source import DiffusionSource, copy_graph
from facetron.export.onnx_export import ModelDims, export_model
from facetron.export.onnx_graph import MODELS as _NET_ARTIFACTS, read_io
from facetron.export.runtime_choice import check_precision_choice, cpu_flags, rule_text
from facetron.export.runtime_choice_cache import cache_root as runtime_choice_cache_root
from facetron.export.runtime_lora import TEXT_ENCODER_TARGET_SUFFIXES
from facetron.pipeline.net_io import check_int8
from facetron.faces.detector import mtcnn_onnx_paths
from facetron.faces.embedder import embedder_onnx_path
from facetron.paths import REPO_ROOT
from facetron.rss_monitor import RssMonitor, peaks_line
from facetron.style_registry import styles_for
from facetron.users import UserRegistry

SOURCE_REPOSITORY = REPO_ROOT / "model_repository"
#: ``--cpu-runtime``: one runtime for every net, or ``auto`` (measured per net at assembly)
CPU_RUNTIME_CHOICES = ("auto",) + NET_RUNTIMES
#: beside the models' folders: each net's runtime, and for ``auto`` the numbers it was chosen by
RUNTIME_CHOICE_FILE = "runtime_choice.json"


def _mtcnn(name: str) -> Callable[[Path], None]:
    def build(dest: Path) -> None:
        shutil.copyfile(mtcnn_onnx_paths()[name], dest)

    return build


def _embedder(dest: Path) -> None:
    shutil.copyfile(embedder_onnx_path(), dest)


ARTIFACT_BUILDERS: dict[str, Callable[[Path], None]] = {
    "face_embedder": _embedder,
    "mtcnn_pnet": _mtcnn("pnet"),
    "mtcnn_rnet": _mtcnn("rnet"),
    "mtcnn_onet": _mtcnn("onet"),
}


def _write_model(
    model: ModelDef, target: Target, dest: Path, diffusion: DiffusionSource | None = None,
    overrides: dict[str, str] | None = None,
) -> None:
    serving = model.serving(target)
    net = diffusion is not None and model.name in diffusion.nets  # an exported diffusion net
    if serving.backend == "onnxruntime" and net:
        # Triton's onnxruntime backend refuses a config -1 where the graph has a fixed dim: the graph's dims
        model = with_graph_dims(model, *read_io(diffusion.net_folder(model.name))[:2], target)
    version = dest / model.name / VERSION_FOLDER
    version.mkdir(parents=True)
    (dest / model.name / "config.pbtxt").write_text(render(model, target, overrides))
    if serving.backend == "python":
        src = SOURCE_REPOSITORY / (model.source or model.name) / VERSION_FOLDER / "model.py"
        if not src.is_file():
            raise InvalidInputError(model.name, f"python model source {src} is missing")
        shutil.copyfile(src, version / "model.py")
    if serving.backend == "tensorrt":
        diffusion.build_plan(model, version)
    elif net:
        diffusion.copy_net(model.name, version)
    elif serving.artifact:
        ARTIFACT_BUILDERS[model.name](version / serving.artifact)
    if model.name == "portrait_generator" and diffusion is not None:
        diffusion.write_generator_files(version)


def _net_runtimes(cpu_runtime: str | Mapping[str, str], nets: tuple[str, ...] = _NET_ARTIFACTS
                  ) -> dict[str, str] | None:
    """{net: runtime} of a fixed ``cpu_runtime`` for each of ``nets`` (None for ``auto``), each checked."""
    if isinstance(cpu_runtime, str):
        if cpu_runtime not in CPU_RUNTIME_CHOICES:
            raise InvalidInputError("--cpu-runtime", f"expected one of {', '.join(CPU_RUNTIME_CHOICES)}, "
                                                     f"got {cpu_runtime!r}")
        return None if cpu_runtime == "auto" else {net: cpu_runtime for net in nets}
    unknown = set(cpu_runtime) - set(nets)
    bad = {k: v for k, v in cpu_runtime.items() if v not in NET_RUNTIMES}
    if unknown or bad:
        raise InvalidInputError("--cpu-runtime", f"per net: nets {', '.join(nets)}, runtimes "
                                                 f"{', '.join(NET_RUNTIMES)}; got {dict(cpu_runtime)!r}")
    return {net: cpu_runtime.get(net, DEFAULT_NET_RUNTIME) for net in nets}


def _net_precisions(precision: str, net_runtimes: dict[str, str] | None, nets: tuple[str, ...] = _NET_ARTIFACTS
                    ) -> dict[str, str] | None:
    """{net: precision} of fixed runtimes (None when ``auto`` measures it); bf16 needs OpenVINO nets."""
    if net_runtimes is None:
        return None if precision == "auto" else {net: precision for net in nets}
    if precision == "auto":
        raise InvalidInputError("--precision", "auto is measured by --cpu-runtime auto (give f32 or bf16 with a "
                                               "fixed runtime)")
    if precision == "bf16" and "openvino" not in net_runtimes.values():
        raise InvalidInputError("--precision", "bf16 runs on OpenVINO only: give --cpu-runtime openvino or auto")
    return {net: precision if runtime == "openvino" else "f32" for net, runtime in net_runtimes.items()}


def assemble_repository(
    target: Target,
    out: str | Path,
    models: Iterable[str] | None = None,
    diffusion: DiffusionSource | None = None,
    users_dir: str | Path | None = None,
    identity_mode: str = "runtime_lora",
    cpu_runtime: str | Mapping[str, str] = DEFAULT_NET_RUNTIME,
    precision: str = "f32",
    int8: str = "off",
    remeasure: bool = False,
) -> Path:
    """Write the repository for ``target`` into ``out`` (replacing it atomically).

    Without ``diffusion`` only the face stack + tokenizer are written; with it
    the diffusion models and the portrait models too (cpu target: exported
    from ``diffusion.base_model`` into the version folders); with ``diffusion.tiny_vae``
    the tiny autoencoder's ``vae_decoder_tiny`` / ``vae_encoder_tiny`` too (a
    request's ``vae=tiny``); with ``diffusion.distill_lora`` the few-step UNet
    ``unet_fewstep`` too (a request with a few-step scheduler; its python model
    is the ``unet``'s code, ``ModelDef.source``); with ``diffusion.controlnet`` the
    ``controlnet`` model too and the ``unet``'s control graph (template mode's
    ``control``; the ``controlnet`` runs on the ``unet``'s runtime and precision); with
    ``diffusion.inpaint_unet`` the ``unet_inpaint`` model too (template mode's UNet; the ``unet``'s code,
    ``ModelDef.source``; with ``cpu_runtime="auto"`` it takes the ``unet``'s measured choice).

    ``cpu_runtime`` (cpu target): the runtime of the nets (``text_encoder``,
    ``unet``, ``unet_fewstep``, ``vae_*``, ``vae_*_tiny``): ``onnxruntime`` | ``openvino`` for all, a
    ``{net: runtime}`` mapping, or ``auto`` — measured per net on this machine
    (:meth:`DiffusionSource.choose_runtimes`). The choice (and for ``auto``
    its numbers) goes into :data:`RUNTIME_CHOICE_FILE` at the repository
    root and into each net's ``runtime`` parameter.

    ``precision`` (cpu target, :mod:`facetron.export.runtime_choice`): ``f32``;
    ``bf16`` — every OpenVINO net in bf16 (needs OpenVINO nets); ``auto`` —
    with ``cpu_runtime="auto"``, OpenVINO bf16 is one more measured candidate
    per net, eligible within torch's own bf16 deviation. Each net's choice is
    its ``precision`` parameter.

    ``int8`` (cpu target, opt-in): the served UNet — and ``unet_fewstep`` where the repository serves it,
    calibrated and judged on its own few-step path — as int8 OpenVINO IRs
    (``weights`` | ``full`` | ``hybrid``, :meth:`DiffusionSource.quantize_unet`),
    each one's deviation recorded beside it; those nets then run in OpenVINO f32
    (their fallback is the fp32 ONNX graph in ONNX Runtime); :data:`RUNTIME_CHOICE_FILE`'s ``int8_nets``
    names them.

    ``cpu_runtime="auto"`` keeps each net's measured choice per kind of machine and graph architecture
    (:mod:`facetron.export.runtime_choice_cache`, under the data root) and reuses a kept one instead of
    measuring again (its entry says ``reused``: the file); ``remeasure`` measures every net again.

    The resident memory (process + children) is sampled throughout; its peak and the wall seconds of each
    stage (``export``, ``choose <net>``, ``int8``, ``write``) are printed at the end and recorded in
    :data:`RUNTIME_CHOICE_FILE` (``peak_rss_gib``, ``stage_s``)."""
    if target not in TARGETS:
        raise InvalidInputError("--target", f"expected one of {', '.join(TARGETS)}, got {target!r}")
    if identity_mode not in IDENTITY_MODES:
        raise InvalidInputError("--identity-mode", f"expected one of {', '.join(IDENTITY_MODES)}, got {identity_mode!r}")
    nets = diffusion.nets if diffusion is not None else _NET_ARTIFACTS  # + the tiny autoencoder's, if given
    net_runtimes = _net_runtimes(cpu_runtime, nets)  # None = auto
    auto = net_runtimes is None
    check_precision_choice(precision)
    check_int8(int8, "--int8")
    if int8 != "off" and (target != "cpu" or diffusion is None):
        raise InvalidInputError("--int8", "quantizes the cpu target's UNet (assemble with the diffusion models)")
    if target != "cpu":
        given = "--cpu-runtime" if net_runtimes != {net: DEFAULT_NET_RUNTIME for net in nets} else (
            "--precision" if precision != "f32" else None)
        if given:
            raise InvalidInputError(given, f"applies to the cpu target only (the {target} target's nets run on its "
                                           "native backends)")
        net_runtimes = None  # the gpu configs keep their own parameters
    net_precisions = _net_precisions(precision, net_runtimes, nets) if target == "cpu" else None  # None = auto / gpu
    overrides = {"identity_mode": identity_mode}
    if users_dir:
        overrides["users_dir"] = str(Path(users_dir).resolve())
    chosen = models_for(target, diffusion=diffusion is not None,
                        tiny_vae=diffusion is not None and diffusion.tiny_vae is not None,
                        fewstep=diffusion is not None and diffusion.distill_lora is not None,
                        inpaint=diffusion is not None and diffusion.inpaint_unet is not None)
    if diffusion is not None and diffusion.controlnet is not None:  # --controlnet: the controlnet model too
        chosen.append(CONTROLNET_MODEL)
    if models is not None:
        wanted = set(models)
        unknown = wanted - {m.name for m in chosen}
        if unknown:
            raise InvalidInputError("--models", f"not served on target {target}: {sorted(unknown)}")
        chosen = [m for m in chosen if m.name in wanted]
    # --int8: the unet always; unet_fewstep too where this repository serves it
    int8_nets = ([UNET.name] + [m.name for m in chosen if m.name == UNET_FEWSTEP.name]) if int8 != "off" else []
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidInputError(str(out), f"cannot create the output folder ({exc.strerror})") from None
    tensorrt = False  # gpu target: the nets of TENSORRT_NETS as TensorRT plans where TensorRT imports here
    if target == "gpu" and diffusion is not None and any(m.name in TENSORRT_NETS for m in chosen):
        from facetron.export.trt import tensorrt_unavailable_reason

        reason = tensorrt_unavailable_reason()
        tensorrt = reason is None
        print(f"[export] gpu target: {', '.join(TENSORRT_NETS)} as " + (
            "tensorrt_plan models (fp16 engines built now, for this TensorRT and GPU)" if tensorrt else
            f"onnxruntime_onnx models with ORT's TensorRT accelerator (engines built at first load, cached under "
            f"{TRT_ENGINE_CACHE_ROOT}): {reason}"), flush=True)
    overrides_by_model: dict[str, dict[str, str]] = {}
    with RssMonitor() as rss, atomic_dir(out) as tmp:
        measured = None
        if diffusion is not None:
            with rss.stage("export"):
                diffusion.export(tmp / ".export")
            if auto:
                measured = diffusion.choose_runtimes(precision, nets=[n for n in nets if n != CONTROLNET_MODEL.name],
                                                     cache=runtime_choice_cache_root(), reuse=not remeasure, rss=rss)
                net_runtimes = {net: measured[net]["runtime"] for net in measured}
                net_precisions = {net: measured[net]["precision"] for net in measured}
            if int8 != "off":  # the int8 IR runs in OpenVINO, with OpenVINO's int8 kernels (precision hint f32)
                with rss.stage("int8"):  # the unet, and the few-step unet where the repository serves it
                    for name in int8_nets:
                        diffusion.quantize_unet(int8, name)
                for name in int8_nets:
                    net_runtimes[name], net_precisions[name] = "openvino", "f32"
                overrides_by_model = {name: {"int8": int8} for name in int8_nets}
            if net_runtimes is not None and CONTROLNET_MODEL.name in nets:  # the ControlNet runs as the unet runs
                net_runtimes[CONTROLNET_MODEL.name] = net_runtimes["unet"]
                net_precisions[CONTROLNET_MODEL.name] = net_precisions["unet"]
        with rss.stage("write"):
            for model in chosen:
                if tensorrt and model.name in TENSORRT_NETS:
                    model = with_tensorrt_plan(model)
                model_overrides = dict(overrides)
                if net_runtimes is not None and model.name in net_runtimes:
                    model_overrides["runtime"] = net_runtimes[model.name]
                    model_overrides["precision"] = net_precisions[model.name]
                model_overrides.update(overrides_by_model.get(model.name, {}))
                _write_model(model, target, tmp, diffusion, model_overrides)
        if diffusion is not None and target == "cpu":
            atomic_write_json(tmp / RUNTIME_CHOICE_FILE, {
                "mode": "auto" if measured is not None else "fixed",
                "runtimes": net_runtimes,
                "precisions": net_precisions,
                "int8": int8,
                "int8_nets": int8_nets,  # the nets served as int8 IRs (--int8: unet, + unet_fewstep if served)
                "cpu": cpu_flags(),
                "rule": rule_text(precision) if measured is not None else "given by --cpu-runtime / --precision",
                "measurements": measured,
                # auto: where measured choices are kept, and which nets took a kept one (their entry's "reused")
                "choice_cache": None if measured is None else {
                    "folder": str(runtime_choice_cache_root()), "remeasure": remeasure,
                    "reused": {n: e["reused"] for n, e in measured.items() if "reused" in e}},
                # sampled resident memory, process + children (the whole span: "overall")
                "peak_rss_gib": rss.peaks_gib(),
                "stage_s": rss.seconds(),
            })
        shutil.rmtree(tmp / ".export", ignore_errors=True)
    print(f"[export] {peaks_line(rss.peaks_gib(), rss.interval_s)}", flush=True)
    print("[export] seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in rss.seconds().items()), flush=True)
    return out


def source_models() -> list[ModelDef]:
    """Every model whose code and cpu config are checked in under ``model_repository/``: the cpu target's
    models with every option (``--tiny-vae``, ``--distill-lora``, ``--controlnet``, ``--inpaint-unet``)."""
    return [*models_for("cpu", diffusion=True, tiny_vae=True, fewstep=True, inpaint=True), CONTROLNET_MODEL]


def write_source_configs(root: Path = SOURCE_REPOSITORY) -> list[Path]:
    """Regenerate the checked-in cpu configs (run after editing model_configs)."""
    written = []
    for model in source_models():
        path = root / model.name / "config.pbtxt"
        path.write_text(render(model, "cpu"))
        written.append(path)
    return written


def add_merged_user(
    repo: str | Path,
    user_id: str,
    users_dir: str | Path,
    base_model: str | Path | None = None,
    style_lora: str | Path | None = None,
    w_face: float = DEFAULT_W_FACE,
    w_style: float = DEFAULT_STYLE_WEIGHT,
    target: Target = "cpu",
    *,
    style: str | None = None,
    refit: bool = False,
) -> Path:
    """Serving mode 1: write ``unet_user_<id>`` (the user's LoRA fused into the
    UNet, exported to ONNX) into an assembled repository, atomically, without
    touching the other models. A server in explicit model-control mode loads
    it on the user's first request.

    ``target="gpu"``: a native model (:func:`_install_gpu_unet`) — where
    TensorRT imports here and can build, a ``tensorrt_plan`` (fp16, one profile
    over batch 1..max_batch_size and every side a request may ask for,
    ``trt_build.json`` naming the TensorRT version and GPU; ``refit``: the
    repository's refit-enabled engine refitted with this user's weights, seconds
    instead of a build — ``facetron export refit``); elsewhere it says why in one
    line and writes ``onnxruntime_onnx`` with ORT's TensorRT accelerator (the
    same profile; engines cached per model under ``TRT_ENGINE_CACHE_ROOT``).

    ``style``: a style of the registry beside ``users_dir``
    (:mod:`facetron.style_registry`) whose LoRA is fused too, at the style's weight
    (``w_style`` when it gives none) — the runtime bank's face + style sum.
    ``style_lora``: a LoRA file instead (weight ``w_style``). The merged model
    records what went in (``1/facetron_merge.json``). A user LoRA's
    text-encoder layers are not fused here: the served ``text_encoder`` is the
    runtime-LoRA text encoder in both modes, and applies them per request from
    the user registry (``user_id``, sent by ``portrait_generator`` in merged
    mode too) — equal to a fused text encoder (tests/test_diffusers_parity.py)
    without a second per-user model to load.

    Prints one line with the wall seconds of each stage (``load``, ``merge``, ``export``, ``write``; JSON after
    ``stage_s``) and each stage's sampled peak RSS (:class:`facetron.rss_monitor.RssMonitor`)."""
    # 1. check the inputs before any work
    repo = Path(repo)
    if not (repo / "portrait_generator" / "config.pbtxt").is_file():
        raise InvalidInputError(str(repo), "is not an assembled facetron repository with the diffusion models")
    if target not in TARGETS:
        raise InvalidInputError("--target", f"expected one of {', '.join(TARGETS)}, got {target!r}")
    written_for = _repository_target(repo)
    if written_for is not None and written_for != target:
        raise InvalidInputError("--target", f"{repo} is a {written_for} repository; a {target} model would not load "
                                            f"there (give --target {written_for})")
    if refit and target != "gpu":
        raise InvalidInputError("--target", "a refit writes a gpu model (TensorRT); the cpu target has no engines")
    if style is not None and style_lora is not None:
        raise InvalidInputError("--style", "give a style name or a style LoRA file, not both")
    registry = UserRegistry(Path(users_dir))
    user_version = registry.version(user_id)
    try:
        lora = registry.lora_path(user_id)
    except NotFoundError:
        raise NotFoundError(f"--user: no trained LoRA for user {user_id!r} in {registry.root}") from None
    face = load_lora(lora)
    te_layers = len(face.component("text_encoder"))
    unserved = [m for m in face.component("text_encoder") if m.rsplit(".", 1)[-1] not in TEXT_ENCODER_TARGET_SUFFIXES]
    if unserved:  # the runtime-LoRA text encoder serves them in both modes: refuse what it has no inputs for
        raise InvalidInputError("--user", f"user {user_id!r}'s LoRA ({lora}) adapts {len(unserved)} text-encoder layers "
                                          f"the runtime-LoRA text encoder has no inputs for (it covers "
                                          f"{'/'.join(TEXT_ENCODER_TARGET_SUFFIXES)}), e.g. {sorted(unserved)[0]}")
    if style is not None:  # unknown: InvalidInputError naming the style; a style without a LoRA fuses nothing
        style_lora, w_style = styles_for(registry.root).lora(style, w_style)
    # 2. fuse, export and install under a temp name (renamed into place when complete); each stage timed
    model = merged_unet_def(user_id)
    with RssMonitor() as rss:
        with rss.stage("load"):
            base = load_base_model(base_model)
        with rss.stage("merge"):  # in place: the base is read for nothing else (no second UNet in memory)
            plan = lora_plan(face, style_lora, w_face, w_style)
            unet, _ = merge_loras(base, *[lora for lora, _ in plan], w_face=w_face, w_style=w_style, inplace=True)
            provenance = dict(merge_provenance(base, plan), user_id=user_id, style=style, user_version=user_version,
                              text_encoder=(f"{te_layers} text-encoder LoRA layers served by the runtime-LoRA "
                                            f"text_encoder (user_id), not fused here") if te_layers else
                              "base (the LoRA has no text-encoder layers)")
        with tempfile.TemporaryDirectory() as work, atomic_dir(repo / model.name) as tmp:
            with rss.stage("export"):
                export_model("unet", work, unet=unet, dims=ModelDims.of(base))
            with rss.stage("write"):  # gpu: the TensorRT build or refit is part of it
                version = tmp / VERSION_FOLDER
                version.mkdir()
                if target == "gpu":
                    config = _install_gpu_unet(repo, user_id, Path(work) / "unet", version, base, refit)
                else:
                    copy_graph(Path(work) / "unet", version)
                    shutil.copyfile(SOURCE_REPOSITORY / (model.source or model.name) / VERSION_FOLDER / "model.py",
                                    version / "model.py")
                    config = render(model, target)
                atomic_write_json(version / MERGE_INFO, provenance)
                (tmp / "config.pbtxt").write_text(config)
    # one line a bench can parse: the JSON after "stage_s"
    stage_s = dict(rss.seconds(), total=round(sum(rss.seconds().values()), 2))
    print(f"[export add-user] {model.name} stage_s {json.dumps(stage_s)}; {peaks_line(rss.peaks_gib(), rss.interval_s)}",
          flush=True)
    return repo / model.name


def remove_merged_user(repo: str | Path, user_id: str) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Take a user's merged ``unet_user_<id>`` out of an assembled repository (and its TensorRT
    engine cache under ``TRT_ENGINE_CACHE_ROOT`` where that is on this machine): (paths removed,
    (path, why kept) for what facetron did not make). A model folder is facetron's when
    :func:`add_merged_user` made it: the atomic-folder marker, or ``config.pbtxt`` beside
    ``1/facetron_merge.json`` naming this user. A server that loaded the model keeps it until it
    unloads it or restarts."""
    name = merged_unet_name(user_id)
    removed: list[Path] = []
    kept: list[tuple[Path, str]] = []
    folder = Path(repo) / name
    if folder.exists() or folder.is_symlink():
        if owned_folder(folder) or _merge_names_user(folder, user_id):
            remove_tree(folder)
            removed.append(folder)
        else:
            why = f"not a merged model facetron made (no marker, no {VERSION_FOLDER}/{MERGE_INFO} naming {user_id!r})"
            kept.append((folder, why))
    cache = Path(TRT_ENGINE_CACHE_ROOT) / name  # named by facetron's configs: ORT's engine cache of that model
    if cache.is_dir() and not cache.is_symlink():
        remove_tree(cache)
        removed.append(cache)
    return removed, kept


def _merge_names_user(folder: Path, user_id: str) -> bool:
    info = folder / VERSION_FOLDER / MERGE_INFO
    if folder.is_symlink() or not (folder / "config.pbtxt").is_file() or not info.is_file():
        return False
    try:
        return json.loads(info.read_text()).get("user_id") == user_id
    except (OSError, ValueError, AttributeError):
        return False


def _repository_target(repo: Path) -> Target | None:
    """The target an assembled repository was written for (its ``vae_decoder``'s instance kind), None if unknown."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb

    try:
        cfg = text_format.Parse((repo / "vae_decoder" / "config.pbtxt").read_text(), pb.ModelConfig())
    except (OSError, text_format.ParseError):
        return None
    kinds = {g.kind for g in cfg.instance_group}
    by_kind = {pb.ModelInstanceGroup.KIND_GPU: "gpu", pb.ModelInstanceGroup.KIND_CPU: "cpu"}
    return by_kind.get(kinds.pop()) if len(kinds) == 1 else None


def _install_gpu_unet(repo: Path, user_id: str, onnx_dir: Path, version: Path, base, refit: bool) -> str:
    """gpu target: the merged UNet exported in ``onnx_dir`` as a native model in ``version``; returns its
    config. The config is checked against the graph (names, types, dims as Triton's backend checks them)
    and, for a plan, against its profile before any engine work."""
    from facetron.errors import FacetronError
    from facetron.export.model_configs import config_graph_problems, to_proto, with_graph_dims
    from facetron.export.trt import (BUILD_RECORD, ENGINE_FILE, build_served_plan, engine_build_unavailable_reason,
                                     ort_trt_profile, profile_problems, profile_shapes, refit_served_plan,
                                     served_profile_sizes)

    inputs, outputs, _ = read_io(onnx_dir)
    name = merged_unet_def(user_id).name
    sizes = served_profile_sizes(merged_unet_def(user_id).max_batch_size, base.resolution, base.latent_factor)
    shapes = profile_shapes(inputs, sizes)
    reason = engine_build_unavailable_reason()
    if reason is None:
        model = with_graph_dims(merged_unet_def(user_id, tensorrt=True), inputs, outputs)
    else:
        model = with_graph_dims(merged_unet_def(user_id), inputs, outputs, accelerator=ort_trt_profile(shapes))
    cfg = to_proto(model, "gpu")
    graph = [[(t.name, t.dtype, [-1 if isinstance(d, str) else d for d in t.dims]) for t in specs]
             for specs in (inputs, outputs)]
    problems = config_graph_problems(cfg, *graph) + profile_problems(cfg, shapes)
    if problems:  # a bug here, not a user error: say so before minutes of engine work
        raise FacetronError(f"{name}: the gpu config does not fit its graph: {'; '.join(problems)}")
    if reason is not None:
        copy_graph(onnx_dir, version)
        print(f"[export] {name}: {'no refit: ' if refit else ''}onnxruntime_onnx with ORT's TensorRT accelerator "
              f"(fp16, one profile; engine built at first load, cached under {TRT_ENGINE_CACHE_ROOT}/{name}): {reason}",
              flush=True)
    else:
        shutil.copyfile(onnx_dir / "io.json", version / "io.json")  # the tensors the plan was built for
        onnx_path = onnx_dir / MODEL_FILE
        if refit:
            record = refit_served_plan(repo, onnx_path, version, shapes)
            how = f"refitted in {record['refit_seconds']} s"
            if record["template_built_seconds"]:
                how += f" (the refit-enabled engine built first, in {record['template_built_seconds']} s)"
        else:
            record = build_served_plan(onnx_path, version, shapes)
            how = f"built in {record['build_seconds']} s"
        print(f"[export] {name}: tensorrt_plan, fp16 {ENGINE_FILE} {how} for TensorRT {record['tensorrt']} on "
              f"{record['gpu']} ({BUILD_RECORD})", flush=True)
    return render(model, "gpu")
