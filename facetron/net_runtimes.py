"""The runtimes a served ONNX net can run in: ONNX Runtime or OpenVINO.

:func:`open_runtime` gives one object per net whatever the runtime, shaped
like an ONNX Runtime session where the serving code touches it:

* ``run(output_names, feed) -> [arrays]`` (``output_names`` None = all),
* ``get_inputs()`` -> specs with ``name``, ``type`` (``"tensor(float)"``...)
  and ``shape`` (an int per fixed dimension, a str or None where dynamic):
  what :func:`facetron.pipeline.net_io.check_feed` reads,
* ``runtime``: the runtime that actually runs the net (after any fallback).

OpenVINO reads the same ONNX file (no separate IR): the runtime-LoRA UNet's
LoRA tensors stay plain graph inputs, so one compiled graph serves every
user as in ONNX Runtime. Its CPU settings are explicit:
``INFERENCE_PRECISION_HINT=f32`` (its default on CPUs with bf16 but without
AMX is bf16: slower and less exact there, docs/ENVIRONMENT.md), the
``LATENCY`` hint, ``INFERENCE_NUM_THREADS`` = the model's
``intra_op_threads`` (else ``$OMP_NUM_THREADS``), no CPU pinning (the cores
are shared with the other models) and a compiled-model cache under
``facetron.paths.cache_dir("openvino")``. Served nets run static graphs:
one compiled per distinct set of feed shapes (resolution, batch size) on
first use, the last :data:`STATIC_SHAPE_GRAPHS` kept (an LRU); static graphs
are faster than one dynamic graph (``openvino_fp32_static`` vs
``openvino_fp32`` in ``benchmarks/runtimes.py``). ``static_shapes=0`` keeps
one dynamic graph; ``shapes`` fixes the shapes once.

A net that OpenVINO cannot read, compile or run falls back to ONNX Runtime
with one log line naming the net and the reason: a served model never dies
for want of OpenVINO.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from facetron.contract import DEFAULT_NET_RUNTIME as DEFAULT_RUNTIME
from facetron.contract import NET_RUNTIMES as RUNTIMES
from facetron.contract import DEFAULT_NET_PRECISION, NET_PRECISIONS
from facetron.errors import FacetronError, InvalidInputError
from facetron.paths import cache_dir
LOG = logging.getLogger("facetron.runtimes")
#: OpenVINO: static graphs (one per feed shape set: resolution x batch size) a served net keeps compiled.
#: Each holds its own compiled weights (~3-4 GiB for an SD-1.5 UNet in fp32): keep it small. The batch size
#: is part of the key (a batch-dynamic graph lost most of the static gain on the tiny UNet: 9.3 vs 6.6 ms), so
#: a dynamic batcher that forms many batch sizes recompiles on LRU misses (from the on-disk cache when set).
STATIC_SHAPE_GRAPHS = 2
#: OpenVINO compiled-model cache: the most recently used ONNX files kept per precision (tests export many)
CACHED_MODELS = 32

# OpenVINO element types -> ONNX Runtime's type strings (what check_feed compares)
_OV_TYPES = {"f32": "tensor(float)", "i32": "tensor(int32)", "u8": "tensor(uint8)", "i64": "tensor(int64)",
             "f16": "tensor(float16)", "boolean": "tensor(bool)"}


@dataclass(frozen=True)
class InputSpec:
    """One graph input, as ONNX Runtime's ``NodeArg`` shows it."""

    name: str
    type: str
    shape: tuple


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:400]


def check_precision(precision: str, name: str = "precision") -> str:
    if precision not in NET_PRECISIONS:
        raise InvalidInputError(name, f"expected one of {', '.join(NET_PRECISIONS)}, got {precision!r}")
    return precision


def check_runtime(runtime: str, name: str = "runtime") -> str:
    if runtime not in RUNTIMES:
        raise InvalidInputError(name, f"expected one of {', '.join(RUNTIMES)}, got {runtime!r}")
    return runtime


def resolve_threads(threads: int | None) -> int | None:
    """``threads`` when given (> 0), else ``$OMP_NUM_THREADS`` when it is a positive int, else None (the runtime's default)."""
    if threads:
        return int(threads)
    try:
        env = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return None
    return env if env > 0 else None


# ----------------------------------------------------------------------------- ONNX Runtime


#: ONNX Runtime CPU memory between calls: ``shrink`` = the CPU arena, shrunk back to its first region at
#: the end of a run (run option ``memory.enable_memory_arena_shrinkage``; ``shrink_above``: only after big
#: calls); ``no_arena`` = no CPU arena; ``arena`` = the arena keeps its high-water mark for good (ORT's
#: default). Without shrinkage one 16 x 3000x3000 face_detector request left 4.7 GB PSS. Measured on the
#: tiny model, 2 shared cores (PSS after one big call, arena / no_arena / shrink): MTCNN 4 x 3000x3000
#: 1819 / 421 / 225 MB; vae_decoder 2x4x96x96 1469 / 317 / 100; vae_encoder 2x768x768 1935 / 154 / 134;
#: unet 8x4x64x64 8542 / 366 / 96. Cost per typical call: none measurable for small working sets; large
#: ones refault their memory every call: vae_decoder 1x4x64x64 2.07 s (arena) vs 2.37 (shrink) / 2.46
#: (no_arena), unet 2x4x48x48 0.85-0.94 s vs 2.07 / 1.81 (hence ``shrink_above``, or ``arena`` where the
#: call's work is bounded by a budget).
ORT_MEMORY = ("shrink", "no_arena", "arena")
DEFAULT_ORT_MEMORY = "shrink"
#: the UNets keep their arena: their per-call work is bounded by contract.UNET_MAX_BATCH_CELLS, and shrinking after
#: every call doubled a tiny-model step (2x4x48x48: 0.85-0.94 s -> 2.07 s shrinking, 1.81 s without an arena)
UNET_ORT_MEMORY = "arena"


def ort_run_options(memory: str = DEFAULT_ORT_MEMORY):
    """The ``RunOptions`` every run of a session opened with ``memory`` passes (None = ORT's default)."""
    if memory not in ORT_MEMORY:
        raise InvalidInputError("memory", f"expected one of {', '.join(ORT_MEMORY)}, got {memory!r}")
    if memory != "shrink":
        return None
    import onnxruntime as ort

    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


def release_heap() -> None:
    """Give the C heap's free memory back to the system (glibc ``malloc_trim``; nothing elsewhere): numpy's
    and ONNX Runtime's freed blocks below glibc's mmap threshold otherwise stay in the process. Cheap
    (milliseconds); for after a big request."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):  # not glibc
        pass


def ort_session(path: Path, threads: int | None = None, providers: str = "cpu", memory: str = DEFAULT_ORT_MEMORY):
    """An ONNX Runtime session (no idle-thread spinning: cores are shared).

    ``providers="cuda"`` asks for the CUDA provider first (gpu target) and
    fails clearly where onnxruntime has none. ``memory``: see
    :data:`ORT_MEMORY` (``shrink`` needs :func:`ort_run_options` on each run)."""
    import onnxruntime as ort

    ort_run_options(memory)  # checks the name

    chain = ["CPUExecutionProvider"]
    if providers == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise FacetronError(f"{path}: the CUDA execution provider is not available in this onnxruntime")
        chain = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.enable_cpu_mem_arena = memory != "no_arena"
    return ort.InferenceSession(str(path), sess_options=opts, providers=chain)


class OrtRuntime:
    """A net in an ONNX Runtime session (``reuse_inputs``: see :func:`open_runtime`; ``memory``: :data:`ORT_MEMORY`).

    ``shrink_above`` (with ``memory="shrink"``): calls whose feed holds at most this many elements in all
    keep the arena (the steady state of typical calls stays allocated), bigger ones shrink it at their end;
    0 = every call shrinks."""

    runtime = "onnxruntime"

    def __init__(self, path: Path, threads: int | None = None, providers: str = "cpu", *,
                 reuse_inputs: bool = False, memory: str = DEFAULT_ORT_MEMORY, shrink_above: int = 0):
        self.path = Path(path)
        self.memory, self.shrink_above = memory, shrink_above
        self.run_options = ort_run_options(memory)
        self.session = ort_session(self.path, threads, providers, memory)
        self.reuse_inputs = reuse_inputs
        self._binding = self.session.io_binding() if reuse_inputs else None
        self._bound: dict[str, tuple[np.ndarray, object]] = {}  # name -> (the caller's array, its OrtValue)
        self._lock = threading.Lock()

    def get_inputs(self):
        return self.session.get_inputs()

    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def _run_options(self, feed: dict[str, np.ndarray]):
        if self.shrink_above and sum(np.size(a) for a in feed.values()) <= self.shrink_above:
            return None
        return self.run_options

    def run(self, output_names: Sequence[str] | None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        if not self.reuse_inputs:
            return self.session.run(None if output_names is None else list(output_names), feed,
                                    self._run_options(feed))
        import onnxruntime as ort

        names = self.output_names() if output_names is None else list(output_names)
        with self._lock:
            binding = self._binding
            if set(feed) != set(self._bound):  # another input set: nothing stale may stay bound
                binding.clear_binding_inputs()
                self._bound.clear()
            for name, arr in feed.items():
                held = self._bound.get(name)
                if held is None or held[0] is not arr:  # the same array object again: its OrtValue shares its memory
                    value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr))
                    binding.bind_ortvalue_input(name, value)
                    self._bound[name] = (arr, value)
            binding.clear_binding_outputs()
            for name in names:
                binding.bind_output(name)
            self.session.run_with_iobinding(binding, self._run_options(feed))
            return binding.copy_outputs_to_cpu()


# ----------------------------------------------------------------------------- OpenVINO


def openvino_config(threads: int | None = None, precision: str = "f32", hint: str = "LATENCY",
                    cache: Path | None = None) -> dict[str, object]:
    """The CPU plugin properties facetron compiles with (see the module doc)."""
    config: dict[str, object] = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": hint,
                                 "ENABLE_CPU_PINNING": False}
    n = resolve_threads(threads)
    if n:
        config["INFERENCE_NUM_THREADS"] = n
    if cache is not None:
        config["CACHE_DIR"] = str(cache)
    return config


def openvino_model(path: Path, shapes: dict[str, Sequence[int]] | None = None):
    """``ov.Model`` read from the ONNX file (external data found beside it), reshaped to ``shapes`` if given."""
    import openvino as ov

    model = ov.Core().read_model(str(path))
    if shapes:
        model.reshape({name: ov.PartialShape(list(shape)) for name, shape in shapes.items()})
    return model


def _onnx_output_name(port) -> str:
    """The ONNX output name of a compiled model's output port (its Result node
    is named ``<name>/sink_port_<i>``; the port's names include ``<name>``)."""
    names = port.get_names()
    base = re.sub(r"/sink_port_\d+$", "", port.get_node().get_friendly_name())
    return base if base in names else port.get_any_name()


class OpenVinoRuntime:
    """A net compiled by OpenVINO for the CPU.

    ``model``: an ``ov.Model`` to compile instead of reading ``path`` (e.g.
    one with compressed weights); ``cache``: the compiled-model cache folder
    (None = no cache). One infer request per compiled graph, serialised by a
    lock (a python model instance runs one batch at a time).

    ``static_shapes`` = k > 0 (and no fixed ``shapes``): no dynamic graph is
    compiled; each distinct set of feed shapes (served resolution, batch
    size) is compiled as a static graph on first use and kept in an LRU of
    ``k`` compiled graphs (faster than one dynamic graph: the
    ``openvino_fp32_static`` rows of ``benchmarks/runtimes.py``). A shape
    seen again after eviction is recompiled (from the on-disk compiled-model
    cache when ``cache`` is set). A graph that fails to compile for a feed
    raises from :meth:`run` (:class:`FallbackRuntime` then moves to ONNX
    Runtime). ``reuse_inputs``: see :func:`open_runtime`."""

    runtime = "openvino"

    def __init__(self, path: Path, threads: int | None = None, *, shapes: dict[str, Sequence[int]] | None = None,
                 precision: str = "f32", hint: str = "LATENCY", cache: Path | None = None, model=None,
                 static_shapes: int = 0, reuse_inputs: bool = False):
        import openvino as ov

        self.path = Path(path)
        self._core = ov.Core()
        if model is None:
            model = openvino_model(self.path, shapes)
        elif shapes:
            model.reshape({name: ov.PartialShape(list(shape)) for name, shape in shapes.items()})
        if not isinstance(static_shapes, int) or static_shapes < 0:
            raise InvalidInputError("static_shapes", f"must be an integer >= 0, got {static_shapes!r}")
        self.static_shapes = 0 if shapes else static_shapes
        # Memory (measured, tiny vae_decoder): a static graph holds one shape's buffers, at most static_shapes
        # graphs are kept and an evicted one's memory is freed (PSS 226 -> 161 MB); shapes cycling over two
        # rounds stayed within 161-242 MB. One dynamic graph (static_shapes=0) keeps its largest call's
        # buffers (113 -> 266 MB after 1x4x64x64, flat after): bounded by the net's budget, not growing.
        # CompiledModel.release_memory() + release_heap() after each call keeps it at ~110 MB but cost 15-40 %
        # per call, so it is not done.
        self.reuse_inputs = reuse_inputs
        self._checked: dict[str, np.ndarray] = {}  # reuse_inputs: the arrays of the last call (shape-checked)
        self.config = openvino_config(threads, precision, hint, cache)
        self._lock = threading.Lock()
        # compiled graphs keyed by the feed's shapes (static mode) or by None (one graph for every shape)
        self._compiled: OrderedDict[tuple | None, tuple] = OrderedDict()
        self.compiles = 0  # graphs compiled so far (static mode: one per new feed shape set)
        if self.static_shapes:
            self._model, self.compiled = model, None
            ports_in, ports_out = model.inputs, model.outputs
        else:
            self._model = None
            self.compiled = self._compile(model, None)[0]
            ports_in, ports_out = self.compiled.inputs, self.compiled.outputs
        self._inputs = [self._spec(p) for p in ports_in]
        self._output_names = [_onnx_output_name(p) for p in ports_out]

    def _compile(self, model, key: tuple | None) -> tuple:
        """(compiled model, its infer request, ONNX output name -> port), kept under ``key``."""
        compiled = self._core.compile_model(model, "CPU", self.config)
        entry = (compiled, compiled.create_infer_request(), {_onnx_output_name(p): p for p in compiled.outputs},
                 {p.get_node().get_friendly_name(): p for p in compiled.inputs}, {})
        self.compiles += 1
        self._compiled[key] = entry
        self.compiled = compiled  # the latest compiled graph (its properties are the config's)
        return entry

    def _entry(self, feed: dict[str, np.ndarray]) -> tuple:
        """The compiled graph for this feed (static mode: compiled on first use of its shapes, LRU-bounded)."""
        if not self.static_shapes:
            return self._compiled[None]
        key = tuple((spec.name, feed[spec.name].shape) for spec in self._inputs)
        entry = self._compiled.get(key)
        if entry is not None:
            self._compiled.move_to_end(key)
            return entry
        import openvino as ov

        model = self._model.clone()
        model.reshape({name: ov.PartialShape(list(shape)) for name, shape in key})
        while len(self._compiled) >= self.static_shapes:
            self._compiled.popitem(last=False)
        return self._compile(model, key)

    @property
    def compiled_shapes(self) -> list[dict[str, tuple]]:
        """The feed shapes of the static graphs held now, least recently used first (static mode)."""
        return [dict(key) for key in self._compiled if key is not None]

    @staticmethod
    def _spec(port) -> InputSpec:
        shape = tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())
        ov_type = port.get_element_type().get_type_name()
        # a port has several tensor names; the Parameter node keeps the ONNX input's name
        return InputSpec(port.get_node().get_friendly_name(), _OV_TYPES.get(ov_type, f"tensor({ov_type})"), shape)

    def get_inputs(self) -> list[InputSpec]:
        return list(self._inputs)

    def output_names(self) -> list[str]:
        return list(self._output_names)

    def run(self, output_names: Sequence[str] | None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        names = list(self._output_names) if output_names is None else list(output_names)
        checked = self._checked
        for spec in self._inputs:  # OpenVINO would reinterpret a wrong rank silently: refuse like ONNX Runtime
            arr = feed.get(spec.name)
            if arr is None:
                raise ValueError(f"input {spec.name!r} is missing from the feed")
            if arr is checked.get(spec.name):  # reuse_inputs: this very array passed the check last call
                continue
            if arr.ndim != len(spec.shape) or any(d is not None and d != g for d, g in zip(spec.shape, arr.shape)):
                raise ValueError(f"input {spec.name!r}: shape {list(arr.shape)} does not fit {list(spec.shape)}")
        feed = {k: v if v is checked.get(k) else np.ascontiguousarray(v) for k, v in feed.items()}
        if self.reuse_inputs:
            self._checked = dict(feed)
        with self._lock:
            _, request, outputs, ports, bound = self._entry(feed)
            if not self.reuse_inputs:
                result = request.infer(feed)  # outputs copied out of the request (share_outputs=False)
            else:
                import openvino as ov

                extra = sorted(set(feed) - set(ports))
                if extra:
                    raise ValueError(f"inputs {extra} are not inputs of this net")
                for name, arr in feed.items():
                    held = bound.get(name)
                    if held is None or held[0] is not arr:  # same array object again: the tensor shares its memory
                        # a read-only array (a broadcast view, a Triton input) cannot be shared: its copy is
                        tensor = ov.Tensor(arr if arr.flags.writeable else arr.copy(), shared_memory=True)
                        request.set_tensor(ports[name], tensor)
                        bound[name] = (arr, tensor)
                result = request.infer()
            return [np.asarray(result[outputs[n]]) for n in names]


class FallbackRuntime:
    """OpenVINO first. When it fails to run a feed that ONNX Runtime runs, the
    net moves to ONNX Runtime for good (one log line); when ONNX Runtime fails
    on that feed too, the feed was bad: its error is raised, OpenVINO stays."""

    def __init__(self, primary: OpenVinoRuntime, fallback):
        self._primary, self._fallback_factory, self._fallback = primary, fallback, None
        self.path = primary.path

    @property
    def runtime(self) -> str:
        return self._active.runtime

    @property
    def _active(self):
        return self._fallback or self._primary

    def get_inputs(self):
        return self._active.get_inputs()

    def output_names(self) -> list[str]:
        return self._active.output_names()

    def run(self, output_names, feed):
        if self._fallback is not None:
            return self._fallback.run(output_names, feed)
        try:
            return self._primary.run(output_names, feed)
        except Exception as exc:  # noqa: BLE001 - any OpenVINO failure: try ONNX Runtime on the same feed
            reason = _one_line(exc)
        fallback = self._fallback_factory()
        out = fallback.run(output_names, feed)  # raises (OpenVINO kept) when the feed itself is bad
        LOG.warning("[facetron] %s: OpenVINO failed to run this net (%s); running it in ONNX Runtime from now on",
                    self.path, reason)
        self._fallback, self._primary = fallback, None
        return out


def model_cache_folder(root: Path | None | bool, path: Path, precision: str) -> Path | None:
    """OpenVINO's compiled-model cache folder for net ``path`` at ``precision``: one folder per
    precision and per ONNX file (its resolved path, size and mtime; the same of its external data).

    OpenVINO's own cache key does not tell precisions apart: a blob compiled with f32 was imported
    for a bf16 compile and gave NaN (measured 2026-12-01, openvino 2026.4.1). Separate folders make
    a wrong blob impossible; a re-exported file gets a new folder."""
    if not root:
        return None
    import hashlib

    parts = [str(path.resolve()), precision]
    for f in (path, path.with_name(path.name + ".data"), path.with_suffix(".bin")):  # ONNX (+ data) or IR
        if f.is_file():
            st = f.stat()
            parts += [str(st.st_size), str(st.st_mtime_ns)]
    folder = Path(root) / precision / hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    os.utime(folder)  # most recently used
    _prune_cache(folder.parent, keep=CACHED_MODELS)
    return folder


def _prune_cache(root: Path, keep: int) -> None:
    """Drop all but the ``keep`` most recently used model folders of ``root`` (only folders named as
    :func:`model_cache_folder` names them: facetron's own cache, nothing else)."""
    import shutil

    ours = sorted((p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"[0-9a-f]{16}", p.name)),
                  key=lambda p: p.stat().st_mtime, reverse=True)
    for old in ours[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def open_runtime(path: str | os.PathLike, runtime: str = DEFAULT_RUNTIME, threads: int | None = None,
                 providers: str = "cpu", *, shapes: dict[str, Sequence[int]] | None = None,
                 cache: Path | None | bool = True, fallback: bool = True, static_shapes: int = STATIC_SHAPE_GRAPHS,
                 reuse_inputs: bool = False, precision: str = DEFAULT_NET_PRECISION,
                 fallback_path: str | os.PathLike | None = None, memory: str = DEFAULT_ORT_MEMORY,
                 shrink_above: int = 0):
    """The net of ONNX file ``path`` in ``runtime`` ("onnxruntime" | "openvino").

    ``threads``: intra-op threads (None/0 = ``$OMP_NUM_THREADS`` for OpenVINO,
    the runtime's default for ONNX Runtime); ``providers``: ONNX Runtime's
    ``cpu`` | ``cuda`` (OpenVINO is a CPU runtime here: with ``cuda`` the net
    runs in ONNX Runtime); ``shapes``: static input shapes for OpenVINO;
    ``static_shapes``: without ``shapes``, OpenVINO compiles a static graph
    per distinct feed shape set on first use and keeps the last
    ``static_shapes`` of them (0 = one dynamic graph for every shape);
    ``reuse_inputs``: an input given as the *same array object* as in the
    previous call is not handed to the runtime again (ONNX Runtime: IOBinding
    of an ``OrtValue`` sharing the array's memory; OpenVINO: a shared-memory
    tensor left set on the infer request) — for the runtime-LoRA graphs, whose
    LoRA stacks repeat every denoising step;
    ``cache``: OpenVINO's compiled-model cache folder (True = facetron's
    cache, False/None = none). With ``fallback`` a net that OpenVINO cannot
    load, compile or run is served by ONNX Runtime (one log line).
    ``precision``: OpenVINO's inference precision, ``f32`` or the opt-in
    ``bf16`` (ONNX Runtime runs f32 and says so once). ``path`` may be an
    OpenVINO IR (``.xml``, e.g. the int8 UNet): ONNX Runtime then runs
    ``fallback_path`` (the ONNX file it was made from). ``memory`` and
    ``shrink_above``: ONNX Runtime's memory between calls (:data:`ORT_MEMORY`,
    :class:`OrtRuntime`; OpenVINO's memory: see :class:`OpenVinoRuntime`)."""
    path = Path(path)
    onnx_path = Path(fallback_path) if fallback_path is not None else path
    check_runtime(runtime)
    check_precision(precision)
    if precision != "f32" and (runtime == "onnxruntime" or providers != "cpu"):
        LOG.warning("[facetron] %s: precision %s applies to OpenVINO only; this net runs f32", path, precision)
    if not path.is_file():
        raise FacetronError(f"ONNX file {path} is missing: assemble the repository with `facetron export repository`")
    ort_threads = threads or None
    ort_run_options(memory)  # checks the name before any session opens

    def ort_runtime():
        return OrtRuntime(onnx_path, ort_threads, providers, reuse_inputs=reuse_inputs, memory=memory,
                          shrink_above=shrink_above)

    if runtime == "onnxruntime":
        return ort_runtime()
    if providers != "cpu":
        LOG.warning("[facetron] %s: OpenVINO is a CPU runtime here and providers=%r; running this net in ONNX Runtime",
                    path, providers)
        return ort_runtime()
    try:
        cache_path = model_cache_folder(cache_dir("openvino") if cache is True else cache, path, precision)
    except OSError as exc:
        LOG.warning("[facetron] %s: no OpenVINO compiled-model cache (%s); compiling without one", path, _one_line(exc))
        cache_path = None
    try:
        primary = OpenVinoRuntime(path, threads, shapes=shapes, cache=cache_path, static_shapes=static_shapes,
                                   reuse_inputs=reuse_inputs, precision=precision)
    except Exception as exc:  # noqa: BLE001 - import, read or compile failure
        if not fallback:
            raise
        LOG.warning("[facetron] %s: OpenVINO could not load or compile this net (%s); running it in ONNX Runtime",
                    path, _one_line(exc))
        return ort_runtime()
    if not fallback:
        return primary
    return FallbackRuntime(primary, ort_runtime)
