"""Triton model configs: how each target serves the models of the contract.

The contract itself (names, tensors, batch sizes, limits, typed parameters
with their defaults) lives in :mod:`facetron.contract`; a :class:`ModelDef`
adds only the per-target serving details (backend, instances, artifacts,
dynamic-batching delay, parameter overrides):

* ``cpu`` — this machine: the python backend only; the nets run in ONNX
  Runtime inside python models (exported to facetron's cache on first use).
* ``gpu`` — the NGC ``tritonserver`` container: nets on native backends,
  python models only for glue (cascade, BLS). The text encoder and the VAEs
  are ``tensorrt_plan`` models where TensorRT imports at assembly
  (:func:`with_tensorrt_plan`, engines built by ``export/trt.py``), else
  ``onnxruntime_onnx`` with ORT's TensorRT accelerator (fp16, its engines
  cached under :data:`TRT_ENGINE_CACHE_ROOT`); the runtime-LoRA UNet is a
  python model on ORT's CUDA provider. Written and validated here, not
  served here (no GPU, no native backends in the pip tritonserver).

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
    return ModelDef(c, queue=FACE_QUEUE, cpu=None, gpu=Serving(backend="onnxruntime", kind="KIND_GPU", artifact="model.onnx"))


_ORT_GPU = Serving(backend="onnxruntime", kind="KIND_GPU", artifact="model.onnx", trt_accelerator=True)
_TRT_GPU = Serving(backend="tensorrt", kind="KIND_GPU", artifact="model.plan")
#: gpu target, ORT's TensorRT accelerator: engines cached per model under this folder (mount a volume
#: there to keep them across restarts; without a cache every server rebuilds them at first load)
TRT_ENGINE_CACHE_ROOT = "/tmp/facetron/trt-engines"
#: gpu target: the nets written as ``tensorrt_plan`` models where TensorRT imports at assembly
#: (not the text encoder: it is the runtime-LoRA graph with its LoRA bank, a python model like the unet)
TENSORRT_NETS = ("vae_decoder", "vae_encoder")
_ORT_CPU = Serving(artifact="model.onnx")

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
_UNET_GPU = Serving(kind="KIND_GPU", artifact="model.onnx", parameters={"intra_op_threads": "0", "providers": "cuda"})

DIFFUSION_MODELS: tuple[ModelDef, ...] = (
    # the runtime-LoRA text encoder: the unet's LoRA bank design (per-item user's text-encoder LoRA);
    # gpu: the same python model on ONNX Runtime's CUDA provider
    ModelDef(contract.TEXT_ENCODER, queue_delay_us=1000, queue=NET_QUEUE, cpu=_ORT_CPU, gpu=_UNET_GPU),
    # gpu: the same LoRA-bank python model, ONNX Runtime on its CUDA provider (merged
    # mode's analogue there is a refit-enabled TensorRT engine: export/trt.py)
    # the UNet waits up to 3 ms for other callers' steps, so concurrent generations
    # (of any users) share its batches; callers run 2 instances so they can overlap
    ModelDef(contract.UNET, queue_delay_us=3000, queue=NET_QUEUE, cpu=_ORT_CPU, gpu=_UNET_GPU),
    ModelDef(contract.VAE_DECODER, queue_delay_us=1000, queue=NET_QUEUE, cpu=_ORT_CPU, gpu=_ORT_GPU),
    ModelDef(contract.VAE_ENCODER, queue_delay_us=1000, queue=NET_QUEUE, cpu=_ORT_CPU, gpu=_ORT_GPU),
    ModelDef(contract.PORTRAIT_GENERATOR, cpu=_CALLERS, gpu=_CALLERS),
    ModelDef(contract.PORTRAIT, cpu=_CALLERS, gpu=_CALLERS),
    ModelDef(contract.PORTRAIT_STREAM),  # one instance; its requests run on a bounded set of threads
)


def with_tensorrt_plan(model: ModelDef) -> ModelDef:
    """``model`` (one of :data:`TENSORRT_NETS`) served on the gpu target as a
    TensorRT plan (``model.plan`` built from its ONNX by ``export/trt.py``)."""
    if model.name not in TENSORRT_NETS:
        raise ValueError(f"model {model.name!r} has no TensorRT plan variant (those are {', '.join(TENSORRT_NETS)})")
    return dataclasses.replace(model, gpu=_TRT_GPU)


def merged_unet_def(user_id: str) -> ModelDef:
    """Serving mode 1: one user's merged UNet, a model of its own (code: model_repository/unet_user)."""
    return ModelDef(contract.merged_unet(user_id), queue_delay_us=1000, queue=NET_QUEUE, cpu=_ORT_CPU, gpu=_UNET_GPU,
                    source=contract.MERGED_UNET_SOURCE)


ALL_MODELS = MODELS + DIFFUSION_MODELS
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
        cfg.default_model_filename = serving.artifact or "model.onnx"
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


def models_for(target: Target, diffusion: bool = False) -> list[ModelDef]:
    """Models served on ``target``: the face stack + tokenizer, plus the
    diffusion models when ``diffusion`` (they need exported artifacts)."""
    pool = ALL_MODELS if diffusion else MODELS
    return [m for m in pool if m.serving(target) is not None]
