"""Triton model configs: how each target serves the models of the contract.

The contract itself (names, tensors, batch sizes, limits, typed parameters
with their defaults) lives in :mod:`facetron.contract`; a :class:`ModelDef`
adds only the per-target serving details (backend, instances, artifacts,
dynamic-batching delay, parameter overrides):

* ``cpu`` — this machine: the python backend only; the nets run in ONNX
  Runtime inside python models (exported to facetron's cache on first use).
* ``gpu`` — the NGC ``tritonserver`` container: nets on native backends,
  python models only for glue (cascade, BLS) and for the runtime-LoRA nets.
  The VAEs (:data:`TENSORRT_NETS`) and each merged ``unet_user_<id>``
  (:func:`merged_unet_def`) are ``tensorrt_plan`` models where TensorRT
  imports when they are written (:func:`with_tensorrt_plan`, engines built
  or refitted by ``export/trt.py``), else ``onnxruntime_onnx`` with ORT's
  TensorRT accelerator (fp16, its engines cached under
  :data:`TRT_ENGINE_CACHE_ROOT`); the runtime-LoRA UNet and text encoder
  are python models on ORT's CUDA provider (their LoRA banks). Written and
  validated structurally here (:func:`config_graph_problems`), not served
  here (no GPU, no native backends in the pip tritonserver).

``render(model, target)`` gives the ``config.pbtxt`` text, built as Triton's
own protobuf (``ModelConfig``) so it always parses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from facetron import contract
from facetron.contract import ModelContract

Target = Literal["cpu", "gpu"]
TARGETS: tuple[Target, ...] = ("cpu", "gpu")


@dataclass(frozen=True)
class Serving:
    """How a model is served on one target."""

    backend: str = "python"  # "python" | "onnxruntime" | "tensorrt"
    kind: str = "KIND_CPU"
    count: int = 1
    artifact: str | None = None  # file in the version folder (model.onnx / model.plan)
    parameters: dict[str, str] = field(default_factory=dict)  # overrides of the contract's defaults
    trt_accelerator: bool = False  # ORT's TensorRT execution accelerator (fp16)
    accelerator: dict[str, str] = field(default_factory=dict)  # more parameters of that accelerator
    #: native backends: tensor -> the graph's shape without the batch dim, where it differs from the
    #: config's dims (a graph input [N] is dims [1] with reshape [], the contract's per-item scalar)
    reshape: dict[str, tuple[int, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class QueuePolicy:
    """Triton's default queue policy: a bounded queue whose requests give up
    after ``timeout_s`` (clients may ask for less) with a clear UNAVAILABLE,
    instead of piling up without limit."""

    max_queue_size: int
    timeout_s: float


NET_QUEUE = QueuePolicy(max_queue_size=256, timeout_s=300.0)  # one request per denoising step per caller
FACE_QUEUE = QueuePolicy(max_queue_size=256, timeout_s=60.0)
CALL_QUEUE = QueuePolicy(max_queue_size=32, timeout_s=600.0)  # whole generations: few, long


@dataclass(frozen=True)
class ModelDef:
    """A served model: its contract (facetron.contract) + how each target serves it."""

    contract: ModelContract
    queue_delay_us: int | None = None  # dynamic batching (for models with max_batch_size > 0)
    queue: QueuePolicy = CALL_QUEUE
    cpu: Serving | None = Serving()
    gpu: Serving | None = Serving()
    source: str | None = None  # python model code folder in model_repository/ (default: the name)

    name = property(lambda self: self.contract.name)
    doc = property(lambda self: self.contract.doc)
    inputs = property(lambda self: self.contract.inputs)
    outputs = property(lambda self: self.contract.outputs)
    max_batch_size = property(lambda self: self.contract.max_batch_size)
    decoupled = property(lambda self: self.contract.decoupled)

    @property
    def parameters(self) -> dict[str, str]:
        """The contract's parameter defaults as config strings."""
        return self.contract.params().to_config()

    def serving(self, target: Target) -> Serving | None:
        return self.cpu if target == "cpu" else self.gpu


def _mtcnn_net(c: ModelContract) -> ModelDef:
    return ModelDef(c, queue=FACE_QUEUE, cpu=None,
                    gpu=Serving(backend="onnxruntime", kind="KIND_GPU", artifact=contract.MODEL_FILE))


_ORT_GPU = Serving(backend="onnxruntime", kind="KIND_GPU", artifact=contract.MODEL_FILE, trt_accelerator=True)
_TRT_GPU = Serving(backend="tensorrt", kind="KIND_GPU", artifact="model.plan")
#: gpu target, ORT's TensorRT accelerator: engines cached per model under this folder (mount a volume
#: there to keep them across restarts; without a cache every server rebuilds them at first load)
TRT_ENGINE_CACHE_ROOT = "/tmp/facetron/trt-engines"
#: gpu target: the nets written as ``tensorrt_plan`` models where TensorRT imports at assembly
#: (not the text encoder: it is the runtime-LoRA graph with its LoRA bank, a python model like the unet)
TENSORRT_NETS = ("vae_decoder", "vae_encoder")
_ORT_CPU = Serving(artifact=contract.MODEL_FILE)

MODELS: tuple[ModelDef, ...] = (
    ModelDef(contract.TOKENIZER, queue=FACE_QUEUE),
    ModelDef(contract.FACE_DETECTOR, queue_delay_us=2000, queue=FACE_QUEUE, gpu=Serving(parameters={"nets": "bls"})),
    _mtcnn_net(contract.MTCNN_PNET),
    _mtcnn_net(contract.MTCNN_RNET),
    _mtcnn_net(contract.MTCNN_ONET),
    ModelDef(contract.FACE_EMBEDDER, queue_delay_us=2000, queue=FACE_QUEUE, gpu=_ORT_GPU),
    ModelDef(contract.FACE_SELECT, queue=FACE_QUEUE),
)


# --- diffusion -------------------------------------------------------------------------
# Artifacts (ONNX) come from `facetron export onnx` of the base model; the cpu
# target runs them in ONNX Runtime inside python models, the gpu target on
# native backends. `unet` is the runtime-LoRA UNet (one graph for all users):
# on cpu its python model keeps a bounded LRU bank of users' LoRA tensors and
# applies each batch item's user, so requests of different users share a
# batch and no user needs a reload (ARCHITECTURE.md, serving mode 2).
_CALLERS = Serving(count=2)
_UNET_GPU = Serving(kind="KIND_GPU", artifact=contract.MODEL_FILE,
                    parameters={"intra_op_threads": "0", "providers": "cuda"})

DIFFUSION_MODELS: tuple[ModelDef, ...] = (
    # the runtime-LoRA text encoder: the unet's LoRA bank design (per-item user's text-encoder LoRA);
    # gpu: the same python model on ONNX Runtime's CUDA provider
    ModelDef(contract.TEXT_ENCODER, queue_delay_us=1000, queue=NET_QUEUE, cpu=_ORT_CPU, gpu=_UNET_GPU),
    # gpu: the same LoRA-bank python model, ONNX Runtime on its CUDA provider (merged mode's
    # unet_user_<id> there is native: a TensorRT plan built or refitted per user, merged_unet_def)
    # the UNet waits up to 3 ms for other callers' steps, so concurrent generations
    # (of any users) share its batches; callers run 2 instances so they can overlap
    ModelDef(contract.UNET, queue_delay_us=3000, queue=NET_QUEUE, cpu=_ORT_CPU, gpu=_UNET_GPU),
    ModelDef(contract.VAE_DECODER, queue_delay_us=1000, queue=NET_QUEUE, cpu=_ORT_CPU, gpu=_ORT_GPU),
    ModelDef(contract.VAE_ENCODER, queue_delay_us=1000, queue=NET_QUEUE, cpu=_ORT_CPU, gpu=_ORT_GPU),
    ModelDef(contract.PORTRAIT_GENERATOR, cpu=_CALLERS, gpu=_CALLERS),
    ModelDef(contract.PORTRAIT, cpu=_CALLERS, gpu=_CALLERS),
    ModelDef(contract.PORTRAIT_STREAM),  # one instance; its requests run on a bounded set of threads
)
#: the tiny autoencoder (AutoencoderTiny, TAESD: a request's vae=tiny), written only by ``export repository
#: --tiny-vae DIR``: served like the full VAEs (gpu: onnxruntime_onnx with ORT's TensorRT accelerator, no plan)
TINY_VAE_MODELS: tuple[ModelDef, ...] = (
    ModelDef(contract.VAE_DECODER_TINY, queue_delay_us=1000, queue=NET_QUEUE, cpu=_ORT_CPU, gpu=_ORT_GPU),
    ModelDef(contract.VAE_ENCODER_TINY, queue_delay_us=1000, queue=NET_QUEUE, cpu=_ORT_CPU, gpu=_ORT_GPU),
)


#: the few-step UNet (a distillation LoRA merged into the base UNet), written only by ``export repository
#: --distill-lora FILE``: served exactly like the runtime-LoRA ``unet`` (its code: model_repository/unet)
FEWSTEP_MODELS: tuple[ModelDef, ...] = (
    ModelDef(contract.UNET_FEWSTEP, queue_delay_us=3000, queue=NET_QUEUE, cpu=_ORT_CPU, gpu=_UNET_GPU,
             source=contract.UNET.name),
)


#: the inpainting UNet (a user's 9-channel SD-1.5 inpainting UNet as the runtime-LoRA graph), written only by ``export
#: repository --inpaint-unet DIR``: served like the runtime-LoRA ``unet`` (its code: model_repository/unet)
INPAINT_MODELS: tuple[ModelDef, ...] = (
    ModelDef(contract.UNET_INPAINT, queue_delay_us=3000, queue=NET_QUEUE, cpu=_ORT_CPU, gpu=_UNET_GPU,
             source=contract.UNET.name),
)


def with_tensorrt_plan(model: ModelDef) -> ModelDef:
    """``model`` (one of :data:`TENSORRT_NETS`) served on the gpu target as a
    TensorRT plan (``model.plan`` built from its ONNX by ``export/trt.py``)."""
    if model.name not in TENSORRT_NETS:
        raise ValueError(f"model {model.name!r} has no TensorRT plan variant (those are {', '.join(TENSORRT_NETS)})")
    return dataclasses.replace(model, gpu=_TRT_GPU)


def merged_unet_def(user_id: str, tensorrt: bool = False) -> ModelDef:
    """Serving mode 1: one user's merged UNet, a model of its own. cpu: a python model over ONNX
    Runtime (code: model_repository/unet_user); gpu: native — a ``tensorrt_plan`` (``tensorrt``: TensorRT
    imported when the user was added) or ``onnxruntime_onnx`` with ORT's TensorRT accelerator. The gpu
    configs need the graph's dims: :func:`with_graph_dims`."""
    return ModelDef(contract.merged_unet(user_id), queue_delay_us=1000, queue=NET_QUEUE, cpu=_ORT_CPU,
                    gpu=_TRT_GPU if tensorrt else _ORT_GPU, source=contract.MERGED_UNET_SOURCE)


def with_graph_dims(model: ModelDef, inputs, outputs, target: Target = "gpu",
                    accelerator: dict[str, str] | None = None) -> ModelDef:
    """``model`` as a native backend on ``target`` serves the graph whose tensors are ``inputs`` /
    ``outputs`` (``TensorSpec``s of its ``io.json``; first dim ``N`` when the model batches).

    The contract leaves model-dependent dims at -1 (channels, hidden size); Triton's onnxruntime
    backend refuses a config -1 where the graph has a fixed dim, so those become the graph's. A
    graph tensor of batch only (``timestep`` [N]) keeps the contract's dims [1] with ``reshape: []``.
    Names must match; a fixed contract dim the graph contradicts is a ValueError.
    ``accelerator``: more parameters of ORT's TensorRT accelerator (e.g. its profile)."""
    serving = model.serving(target)
    if serving is None or serving.backend == "python":
        raise ValueError(f"model {model.name!r} is not served by a native backend on target {target!r}")
    reshape = dict(serving.reshape)

    def fit(t: contract.Tensor, spec) -> contract.Tensor:
        graph = list(spec.dims)
        if model.max_batch_size > 0:
            if not graph or not isinstance(graph[0], str):
                raise ValueError(f"{model.name}: graph tensor '{t.name}' {graph} has no batch dim")
            graph = graph[1:]
        if not graph and t.dims == (1,):
            reshape[t.name] = ()
            return t
        if len(graph) != len(t.dims):
            raise ValueError(f"{model.name}: '{t.name}' is {list(t.dims)} in the contract, {graph} in the graph")
        dims = []
        for c, g in zip(t.dims, graph):
            if isinstance(g, str) or c == g:
                dims.append(c)
            elif c == -1:
                dims.append(int(g))
            else:
                raise ValueError(f"{model.name}: '{t.name}' is {list(t.dims)} in the contract, {graph} in the graph")
        return dataclasses.replace(t, dims=tuple(dims))

    def fitted(tensors, specs, kind: str) -> tuple:
        by_name = {s.name: s for s in specs}
        if set(by_name) != {t.name for t in tensors}:
            raise ValueError(f"{model.name}: {kind} {sorted(t.name for t in tensors)} in the contract, "
                             f"{sorted(by_name)} in the graph")
        return tuple(fit(t, by_name[t.name]) for t in tensors)

    c = dataclasses.replace(model.contract, inputs=fitted(model.inputs, inputs, "inputs"),
                            outputs=fitted(model.outputs, outputs, "outputs"))
    serving = dataclasses.replace(serving, reshape=reshape, accelerator={**serving.accelerator, **(accelerator or {})})
    return dataclasses.replace(model, contract=c, **{target: serving})


ALL_MODELS = MODELS + DIFFUSION_MODELS + TINY_VAE_MODELS + FEWSTEP_MODELS + INPAINT_MODELS
BY_NAME = {m.name: m for m in ALL_MODELS}


def to_proto(model: ModelDef, target: Target, parameters: dict[str, str] | None = None):
    """The model's ``ModelConfig`` protobuf for ``target`` (``parameters``
    override the model's own values for keys it declares)."""
    from tritonclient.grpc import model_config_pb2 as pb

    serving = model.serving(target)
    if serving is None:
        raise ValueError(f"model {model.name!r} is not served on target {target!r}")
    cfg = pb.ModelConfig(name=model.name, max_batch_size=model.max_batch_size)
    if serving.backend == "python":
        cfg.backend = "python"
    elif serving.backend == "onnxruntime":
        cfg.platform = "onnxruntime_onnx"
        cfg.default_model_filename = serving.artifact or contract.MODEL_FILE
    elif serving.backend == "tensorrt":
        cfg.platform = "tensorrt_plan"
        cfg.default_model_filename = serving.artifact or "model.plan"
    else:
        raise ValueError(f"unknown backend {serving.backend!r}")
    for spec, seq in ((model.inputs, cfg.input), (model.outputs, cfg.output)):
        for t in spec:
            item = seq.add()
            item.name = t.name
            item.data_type = pb.DataType.Value(f"TYPE_{t.dtype}")
            item.dims.extend(t.dims)
            if t.optional:
                item.optional = True
            if t.name in serving.reshape:
                item.reshape.SetInParent()  # present even when empty: [] is the graph's [N] without N
                item.reshape.shape.extend(serving.reshape[t.name])
    group = cfg.instance_group.add()
    group.count = serving.count
    group.kind = pb.ModelInstanceGroup.Kind.Value(serving.kind)
    if model.queue_delay_us is not None:
        cfg.dynamic_batching.max_queue_delay_microseconds = model.queue_delay_us
    policy = cfg.dynamic_batching.default_queue_policy
    policy.timeout_action = pb.ModelQueuePolicy.TimeoutAction.REJECT
    policy.default_timeout_microseconds = int(model.queue.timeout_s * 1e6)
    policy.allow_timeout_override = True
    policy.max_queue_size = model.queue.max_queue_size
    if model.decoupled:
        cfg.model_transaction_policy.decoupled = True
    if serving.trt_accelerator:
        acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add()
        acc.name = "tensorrt"
        acc.parameters["precision_mode"] = "FP16"
        acc.parameters["max_workspace_size_bytes"] = str(1 << 30)
        acc.parameters["trt_engine_cache_enable"] = "1"
        acc.parameters["trt_engine_cache_path"] = f"{TRT_ENGINE_CACHE_ROOT}/{model.name}"
        for key, value in serving.accelerator.items():
            acc.parameters[key] = value
    # python models read the contract's typed parameters; native backends only their own
    params = {**model.parameters, **serving.parameters} if serving.backend == "python" else dict(serving.parameters)
    params.update({k: v for k, v in (parameters or {}).items() if k in params})
    for key, value in params.items():
        cfg.parameters[key].string_value = value
    return cfg


def render(model: ModelDef, target: Target, parameters: dict[str, str] | None = None) -> str:
    """``config.pbtxt`` text: a comment header + the protobuf in text format."""
    from google.protobuf import text_format

    header = "".join(f"# {line}\n" for line in model.doc.splitlines())
    header += f"# Generated by `facetron export repository --target {target}` from facetron/contract.py + export/model_configs.py.\n"
    return header + text_format.MessageToString(to_proto(model, target, parameters))


def models_for(target: Target, diffusion: bool = False, tiny_vae: bool = False,
               fewstep: bool = False, inpaint: bool = False) -> list[ModelDef]:
    """Models served on ``target``: the face stack + tokenizer, plus the
    diffusion models when ``diffusion`` (they need exported artifacts), plus
    the tiny autoencoder's when ``tiny_vae`` too (``export repository --tiny-vae``),
    plus ``unet_fewstep`` when ``fewstep`` too (``export repository --distill-lora``),
    plus ``unet_inpaint`` when ``inpaint`` too (``export repository --inpaint-unet``)."""
    pool = MODELS + (DIFFUSION_MODELS if diffusion else ()) + (TINY_VAE_MODELS if diffusion and tiny_vae else ())
    pool += FEWSTEP_MODELS if diffusion and fewstep else ()
    pool += INPAINT_MODELS if diffusion and inpaint else ()
    return [m for m in pool if m.serving(target) is not None]


def config_graph_problems(cfg, graph_inputs, graph_outputs, allow_wildcards: bool | None = None) -> list[str]:
    """Where the Triton ``ModelConfig`` ``cfg`` and a graph disagree the way Triton's native backends
    check at load (empty list = they agree). Graph tensors: ``(name, dtype, shape)`` with Triton dtype
    names (``FP32``) and -1 (or a symbol / None) for dynamic dims.

    Names and types equal; shape = the batch dim (-1) when ``max_batch_size > 0``, then the config's
    dims (its ``reshape`` when given); a fixed graph dim must be the config's value — Triton's
    onnxruntime backend refuses a -1 there; its tensorrt backend accepts -1 (the plan's profile bounds
    it instead: ``export.trt.profile_problems``). ``allow_wildcards``: override that rule (None: by platform)."""
    strict = cfg.platform != "tensorrt_plan" if allow_wildcards is None else not allow_wildcards
    batching = cfg.max_batch_size > 0
    problems = []
    for kind, config_tensors, graph in (("input", cfg.input, graph_inputs), ("output", cfg.output, graph_outputs)):
        by_name = {name: (dtype, [d if isinstance(d, int) and d >= 0 else -1 for d in shape])
                   for name, dtype, shape in graph}
        names = {t.name for t in config_tensors}
        if names != set(by_name):
            problems.append(f"{kind}s: {sorted(names)} in the config, {sorted(by_name)} in the graph")
        for t in config_tensors:
            if t.name not in by_name:
                continue
            dtype, shape = by_name[t.name]
            if f"TYPE_{dtype}" != _pb().DataType.Name(t.data_type):
                problems.append(f"{kind} '{t.name}': {_pb().DataType.Name(t.data_type)} in the config, "
                                f"{dtype} in the graph")
            dims = list(t.reshape.shape) if t.HasField("reshape") else list(t.dims)
            full = ([-1] if batching else []) + dims
            if batching and (not shape or shape[0] != -1):
                problems.append(f"{kind} '{t.name}': batching needs a dynamic first dim, the graph has {shape}")
            if len(full) != len(shape):
                problems.append(f"{kind} '{t.name}': shape {full} in the config, {shape} in the graph")
                continue
            for i, (c, g) in enumerate(zip(full, shape)):
                if g != -1 and c != g and (strict or c != -1):
                    problems.append(f"{kind} '{t.name}': dim {i} is {c} in the config, {g} in the graph")
    return problems


def _pb():
    from tritonclient.grpc import model_config_pb2 as pb

    return pb
