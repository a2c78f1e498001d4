"""TensorRT engines from the ONNX export: build (fp16, shape profiles) and UNet refit.

Written against TensorRT's Python API (8.6 and 10.x), imported lazily. Where
``import tensorrt`` fails (this CPU machine: the wheels are stubs that
download libraries) every entry point raises :class:`TensorRTUnavailable`
with one line: ``TensorRT not available here: <import error>``.

Shapes come from each model's ``io.json``: ``N`` = batch, ``h, w`` = latent
side, ``H, W`` = image side. The default profile covers batch 1–4 (opt 2, a
classifier-free-guidance pair) and 512–768 px images (latent 64–96, opt 64).
The UNet engines are built with ``BuilderFlag.REFIT`` so a user's merged
weights can be swapped in (:func:`refit_engine`, ≈ seconds) instead of a
rebuild (minutes). :func:`trtexec_commands` gives the same builds as
``trtexec`` lines to paste on a GPU host.

Served plans (gpu target, ``export/repository.py``): :func:`served_profile_sizes`
is the one profile a served net is built with (batch 1..max_batch_size, every
side a request may ask for); :func:`build_served_plan` writes ``model.plan`` +
:data:`BUILD_RECORD` (TensorRT version, GPU, compute capability, profile: a
plan runs only there); :func:`refit_served_plan` gives a merged user's engine
as a refit of the repository's refit-enabled UNet engine
(:data:`REFIT_TEMPLATE`, built once per TensorRT version, GPU, profile and
graph structure). Where TensorRT cannot build, :func:`ort_trt_profile` is the
same profile for ORT's TensorRT accelerator, and :func:`profile_problems`
checks a profile against a Triton config on any machine.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from facetron.atomic import atomic_write_bytes, atomic_write_json
from facetron.errors import FacetronError, InvalidInputError
from facetron.export.onnx_graph import MODEL_FILE, TensorSpec, read_io

ENGINE_FILE = "model.plan"
REFIT_MODELS = ("unet", "unet_lora")
UNAVAILABLE = "TensorRT not available here"


class TensorRTUnavailable(FacetronError, RuntimeError):
    """``import tensorrt`` failed on this machine."""

    status = "FAILED_PRECONDITION"


def import_tensorrt():
    """The ``tensorrt`` module, or :class:`TensorRTUnavailable` with the import error in one line."""
    try:
        import tensorrt as trt  # noqa: PLC0415 - optional, heavy, GPU-only
    except Exception as exc:  # ImportError, or the stub wheel's own errors
        raise TensorRTUnavailable(f"{UNAVAILABLE}: {_one_line(exc)}") from None
    return trt


def tensorrt_unavailable_reason() -> str | None:
    """None where TensorRT imports, else the one-line reason."""
    try:
        import_tensorrt()
    except TensorRTUnavailable as exc:
        return str(exc)
    return None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]


# ----------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class ProfileSizes:
    """min / opt / max of batch, image side and runtime-LoRA rank ``R`` (rank buckets up to the
    repository's export rank 16); latent side = image side / latent_factor."""

    batch: tuple[int, int, int] = (1, 2, 4)
    image: tuple[int, int, int] = (512, 512, 768)
    latent_factor: int = 8
    rank: tuple[int, int, int] = (4, 8, 16)

    def sizes(self, which: int) -> dict[str, int]:
        n, px = self.batch[which], self.image[which]
        return {"N": n, "H": px, "W": px, "h": px // self.latent_factor, "w": px // self.latent_factor,
                "R": self.rank[which]}


def profile_shapes(inputs: Sequence[TensorSpec], sizes: ProfileSizes = ProfileSizes()) -> dict[str, tuple[tuple[int, ...], ...]]:
    """``{input: (min_shape, opt_shape, max_shape)}`` for one optimization profile."""
    for which in range(3):
        px = sizes.image[which]
        if px % sizes.latent_factor:
            raise InvalidInputError("image size", f"{px} is not a multiple of the latent factor {sizes.latent_factor}")
    return {s.name: tuple(s.shape(**sizes.sizes(i)) for i in range(3)) for s in inputs}


def _shape_arg(shapes: dict[str, tuple], which: int) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in sh[which])}" for name, sh in shapes.items())


def model_dirs(onnx_dir: str | os.PathLike, models: Sequence[str] | None = None) -> list[Path]:
    onnx_dir = Path(onnx_dir)
    found = sorted(p.parent for p in onnx_dir.glob(f"*/{MODEL_FILE}"))
    if models:
        found = [p for p in found if p.name in models]
    if not found:
        raise InvalidInputError(f"--onnx-dir {onnx_dir}", "holds no exported models (<name>/model.onnx)")
    return found


def trtexec_commands(onnx_dir: str | os.PathLike, engine_dir: str | os.PathLike | None = None, *,
                     sizes: ProfileSizes = ProfileSizes(), models: Sequence[str] | None = None,
                     fp16: bool = True, workspace_mib: int = 8192) -> list[str]:
    """One ``trtexec`` line per exported model, building ``<engine_dir>/<model>/model.plan``.

    Same settings as :func:`build_engine`: fp16, one profile over the batch and
    image ranges, ``--refit`` for the UNet(s)."""
    engine_dir = Path(engine_dir) if engine_dir is not None else Path(onnx_dir)
    lines = []
    for d in model_dirs(onnx_dir, models):
        inputs, _, _ = read_io(d)
        shapes = profile_shapes(inputs, sizes)
        args = ["trtexec", f"--onnx={d / MODEL_FILE}", f"--saveEngine={engine_dir / d.name / ENGINE_FILE}"]
        if fp16:
            args.append("--fp16")
        if d.name in REFIT_MODELS:
            args.append("--refit")
        args += [f"--minShapes={_shape_arg(shapes, 0)}", f"--optShapes={_shape_arg(shapes, 1)}",
                 f"--maxShapes={_shape_arg(shapes, 2)}", f"--memPoolSize=workspace:{workspace_mib}"]
        lines.append(" ".join(shlex.quote(a) for a in args))
    return lines


# ----------------------------------------------------------------------------- build


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike,
                 shapes: dict[str, tuple[tuple[int, ...], ...]], *, fp16: bool = True, refit: bool = False,
                 workspace_mib: int = 8192) -> Path:
    """Parse ``onnx_path`` (external data beside it is found by path) and write a serialized engine."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise InvalidInputError(f"ONNX model {onnx_path}", f"TensorRT could not parse it: {errors[:500]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    profile = builder.create_optimization_profile()
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    for name, (lo, opt, hi) in shapes.items():
        if name not in names:
            raise InvalidInputError(f"ONNX model {onnx_path}", f"has no input '{name}' (inputs: {sorted(names)})")
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise FacetronError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    return atomic_write_bytes(engine_path, bytes(plan))


def build_engines(onnx_dir: str | os.PathLike, engine_dir: str | os.PathLike, *, sizes: ProfileSizes = ProfileSizes(),
                  models: Sequence[str] | None = None, fp16: bool = True) -> dict[str, Path]:
    """Build ``<engine_dir>/<model>/model.plan`` for every exported model (REFIT for the UNets)."""
    import_tensorrt()  # fail before any work
    out = {}
    for d in model_dirs(onnx_dir, models):
        inputs, _, _ = read_io(d)
        print(f"[trt] building {d.name} ...", flush=True)
        out[d.name] = build_engine(d / MODEL_FILE, Path(engine_dir) / d.name / ENGINE_FILE,
                                   profile_shapes(inputs, sizes), fp16=fp16, refit=d.name in REFIT_MODELS)
    return out


# ----------------------------------------------------------------------------- refit


def refit_engine(engine_path: str | os.PathLike, merged_onnx: str | os.PathLike,
                 out_path: str | os.PathLike | None = None) -> dict:
    """Swap a new user's merged weights into a refit-enabled UNet engine.

    Every refittable weight is set by name from the initializers of
    ``merged_onnx`` — an export of the same architecture by the same code, so
    initializer names match those the ONNX parser gave the engine's weights.
    Writes the refitted plan to ``out_path`` (default: in place, atomically)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    trt = import_tensorrt()
    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise InvalidInputError(f"engine {engine_path}", "could not be deserialized by this TensorRT")
    if not engine.refittable:
        raise InvalidInputError(f"engine {engine_path}", "was built without REFIT (rebuild with refit=True / --refit)")
    refitter = trt.Refitter(engine, logger)
    wanted = set(refitter.get_all_weights())
    model = onnx.load(str(merged_onnx))  # loads model.onnx.data too
    keep_alive = []  # trt.Weights does not own its buffer
    n_set = 0
    for init in model.graph.initializer:
        if init.name not in wanted:
            continue
        arr = np.ascontiguousarray(numpy_helper.to_array(init))
        keep_alive.append(arr)
        if not refitter.set_named_weights(init.name, trt.Weights(arr)):
            raise InvalidInputError(f"ONNX model {merged_onnx}", f"weight '{init.name}' {arr.shape} was rejected "
                                                                 "(different architecture?)")
        n_set += 1
    missing = list(refitter.get_missing_weights())
    if missing and hasattr(trt, "OnnxParserRefitter"):  # TRT >= 10: let the parser map folded weights
        if not trt.OnnxParserRefitter(refitter, logger).refit_from_file(str(merged_onnx)):
            raise InvalidInputError(f"ONNX model {merged_onnx}", "TensorRT's ONNX refitter rejected it")
        missing = list(refitter.get_missing_weights())
    if missing:
        raise InvalidInputError(f"ONNX model {merged_onnx}", f"{len(missing)} engine weights have no initializer "
                                                             f"of that name, e.g. {', '.join(missing[:3])}")
    if not refitter.refit_cuda_engine():
        raise FacetronError(f"TensorRT refit of {engine_path} failed (see the log above)")
    path = atomic_write_bytes(out_path or engine_path, bytes(engine.serialize()))
    return {"engine": str(path), "weights_set": n_set, "seconds": round(time.perf_counter() - t0, 3)}


# ----------------------------------------------------------------------------- served plans (gpu target)

#: beside every plan facetron serves: the TensorRT version, GPU and profile it was built for (a plan runs only there)
BUILD_RECORD = "trt_build.json"
#: merged mode (``facetron export refit``): the repository's refit-enabled UNet engine and its record, files at
#: the repository root (Triton serves folders and ignores files there); each new user's engine is a refitted copy
REFIT_TEMPLATE = "unet_refit.plan"
REFIT_TEMPLATE_RECORD = "unet_refit.json"
_TEMPLATE_KEYS = ("tensorrt", "gpu", "compute_capability", "fp16", "refit", "profile", "graph")


def served_profile_sizes(max_batch_size: int, native: int, latent_factor: int) -> ProfileSizes:
    """The one optimization profile a served net's plan is built with: batch 1..``max_batch_size``
    (opt 2: a guidance pair) and every side a request may ask for — ``MIN_LATENT_SIDE`` cells up to
    the default ``max_side_factor`` x ``native`` (``contract.check_budget``) — opt at ``native``."""
    from facetron.contract import MAX_SIDE, MAX_SIDE_FACTOR, MIN_LATENT_SIDE

    top = min(MAX_SIDE, int(MAX_SIDE_FACTOR * native)) // latent_factor * latent_factor
    return ProfileSizes(batch=(1, min(2, max_batch_size), max_batch_size),
                        image=(MIN_LATENT_SIDE * latent_factor, native, top), latent_factor=latent_factor)


def ort_trt_profile(shapes: dict[str, tuple[tuple[int, ...], ...]]) -> dict[str, str]:
    """The same profile as parameters of ORT's TensorRT accelerator in Triton's onnxruntime backend
    (``trt_profile_{min,opt,max}_shapes``): its engine is built once for the whole range, not per new shape."""
    return {f"trt_profile_{which}_shapes": _shape_arg(shapes, i) for i, which in enumerate(("min", "opt", "max"))}


def profile_problems(cfg, shapes: dict[str, tuple[tuple[int, ...], ...]]) -> list[str]:
    """Where profile ``shapes`` fails to cover the Triton ``ModelConfig`` ``cfg`` as Triton's TensorRT
    backend needs (empty list = covered): every config input profiled, rank = batch + the config's dims
    (``reshape`` applied), batch from 1 to at least ``max_batch_size``, each fixed config dim pinned
    (min = opt = max = the dim), min <= opt <= max everywhere, no profiled tensor the config lacks."""
    problems = []
    names = {t.name for t in cfg.input}
    problems += [f"profile input '{n}' is not a config input" for n in shapes if n not in names]
    batching = cfg.max_batch_size > 0
    for t in cfg.input:
        if t.name not in shapes:
            problems.append(f"config input '{t.name}' has no profile shape")
            continue
        lo, opt, hi = shapes[t.name]
        dims = list(t.reshape.shape) if t.HasField("reshape") else list(t.dims)
        full = ([-1] if batching else []) + dims
        if not len(lo) == len(opt) == len(hi) == len(full):
            problems.append(f"'{t.name}': profile ranks {len(lo)}/{len(opt)}/{len(hi)} != config rank {len(full)}")
            continue
        if any(not a <= b <= c for a, b, c in zip(lo, opt, hi)):
            problems.append(f"'{t.name}': min {lo} <= opt {opt} <= max {hi} does not hold")
        if batching and (lo[0] != 1 or hi[0] < cfg.max_batch_size):
            problems.append(f"'{t.name}': profile batch {lo[0]}..{hi[0]} does not cover 1..{cfg.max_batch_size}")
        for i, d in enumerate(full):
            if d != -1 and not lo[i] == opt[i] == hi[i] == d:
                problems.append(f"'{t.name}': dim {i} is {d} in the config, {lo[i]}/{opt[i]}/{hi[i]} in the profile")
    return problems


def gpu_identity() -> dict:
    """``{"gpu": name, "compute_capability": "9.0"}`` of CUDA device 0 (None where unknown)."""
    try:
        import torch  # noqa: PLC0415

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return {"gpu": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}
    except Exception:  # noqa: BLE001 - the record is informative
        pass
    return {"gpu": None, "compute_capability": None}


def engine_build_unavailable_reason() -> str | None:
    """None where TensorRT imports and can create a builder (a CUDA GPU is usable), else the one-line reason."""
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        return reason
    trt = import_tensorrt()
    try:
        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    except Exception as exc:  # noqa: BLE001 - pybind raises TypeError when CUDA cannot start
        return f"{UNAVAILABLE}: TensorRT {trt.__version__} imports but cannot build ({_one_line(exc)})"
    return None if builder is not None else f"{UNAVAILABLE}: TensorRT {trt.__version__} imports but gives no builder"


def graph_fingerprint(onnx_path: str | os.PathLike) -> str:
    """Hash of an ONNX graph's structure (initializer names, types, dims; node types) without its weights:
    equal for every user's merge of one base architecture, which is what a refit needs."""
    import hashlib

    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    h = hashlib.sha256()
    for init in model.graph.initializer:
        h.update(f"{init.name}:{init.data_type}:{tuple(init.dims)};".encode())
    for node in model.graph.node:
        h.update(f"{node.op_type};".encode())
    return h.hexdigest()[:20]


def build_record(trt, shapes: dict[str, tuple[tuple[int, ...], ...]], *, refit: bool, fp16: bool = True,
                 **extra) -> dict:
    """What :data:`BUILD_RECORD` holds: the TensorRT version and GPU a plan was built for, and its profile."""
    return {"tensorrt": trt.__version__, **gpu_identity(), "fp16": fp16, "refit": refit,
            "profile": {k: [list(x) for x in v] for k, v in shapes.items()}, **extra}


def build_served_plan(onnx_path: str | os.PathLike, version: str | os.PathLike,
                      shapes: dict[str, tuple[tuple[int, ...], ...]], *, refit: bool = False) -> dict:
    """``<version>/model.plan`` (fp16, one profile ``shapes``) from ``onnx_path`` and its
    :data:`BUILD_RECORD`. Returns the record."""
    trt = import_tensorrt()
    t0 = time.perf_counter()
    build_engine(onnx_path, Path(version) / ENGINE_FILE, shapes, fp16=True, refit=refit)
    record = build_record(trt, shapes, refit=refit, build_seconds=round(time.perf_counter() - t0, 1))
    atomic_write_json(Path(version) / BUILD_RECORD, record)
    return record


def _read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _template_fits(plan: Path, record: dict | None, want: dict) -> bool:
    if record is None or not plan.is_file() or any(record.get(k) != want.get(k) for k in _TEMPLATE_KEYS):
        return False
    st = plan.stat()  # the record describes this very file (written after it)
    return record.get("plan_bytes") == st.st_size and record.get("plan_mtime_ns") == st.st_mtime_ns


def refit_served_plan(repo: str | os.PathLike, onnx_path: str | os.PathLike, version: str | os.PathLike,
                      shapes: dict[str, tuple[tuple[int, ...], ...]]) -> dict:
    """``<version>/model.plan``: the repository's refit-enabled UNet engine (:data:`REFIT_TEMPLATE`)
    refitted with the weights of ``onnx_path`` (a user's merged UNet), and its :data:`BUILD_RECORD`.

    The template is built (fp16, REFIT, profile ``shapes``; minutes) when the repository has none for
    this TensorRT version, GPU, profile and graph structure — every later user costs a refit (seconds).
    A template file facetron did not record is refused, never overwritten. Returns the record."""
    trt = import_tensorrt()
    repo = Path(repo)
    plan, record_path = repo / REFIT_TEMPLATE, repo / REFIT_TEMPLATE_RECORD
    record = _read_record(record_path)
    if plan.exists() and record is None:
        raise InvalidInputError(str(plan), f"exists without the {REFIT_TEMPLATE_RECORD} facetron writes beside it: "
                                           "facetron did not make it and never replaces it (move it away)")
    want = build_record(trt, shapes, refit=True, graph=graph_fingerprint(onnx_path))
    template_seconds = None
    if not _template_fits(plan, record, want):
        t0 = time.perf_counter()
        print(f"[trt] building the refit-enabled UNet engine {plan} (once per TensorRT version, GPU and profile) ...",
              flush=True)
        build_engine(onnx_path, plan, shapes, fp16=True, refit=True)
        template_seconds = round(time.perf_counter() - t0, 1)
        st = plan.stat()
        atomic_write_json(record_path, {**want, "made_by": "facetron export refit", "build_seconds": template_seconds,
                                        "plan_bytes": st.st_size, "plan_mtime_ns": st.st_mtime_ns})
    result = refit_engine(plan, onnx_path, Path(version) / ENGINE_FILE)
    out = {**want, "refitted_from": REFIT_TEMPLATE, "refit_seconds": result["seconds"],
           "weights_set": result["weights_set"], "template_built_seconds": template_seconds}
    atomic_write_json(Path(version) / BUILD_RECORD, out)
    return out
