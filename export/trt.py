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
"""

from __future__ import annotations

import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from facetron.atomic import atomic_write_bytes
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
