"""Triton model configs: the one source of truth for every served model.

Each :class:`ModelDef` holds the contract (tensors, batching) once and how
it is served per target:

* ``cpu`` — this machine: the python backend only; the nets run in ONNX
  Runtime inside python models (exported to facetron's cache on first use).
* ``gpu`` — the NGC ``tritonserver`` container: nets on native backends
  (``onnxruntime_onnx`` here; ``tensorrt_plan`` where engines were built),
  python models only for glue (cascade, BLS). Written and validated here,
  not served here (no GPU, no native backends in the pip tritonserver).

``render(model, target)`` gives the ``config.pbtxt`` text, built as Triton's
own protobuf (``ModelConfig``) so it always parses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Target = Literal["cpu", "gpu"]
TARGETS: tuple[Target, ...] = ("cpu", "gpu")


@dataclass(frozen=True)
class T:
    """A tensor of a model's contract (dims exclude the batch dim when batching)."""

    name: str
    dtype: str  # Triton type without TYPE_: UINT8, FP32, INT32, INT64, STRING
    dims: tuple[int, ...]
    optional: bool = False


@dataclass(frozen=True)
class Serving:
    """How a model is served on one target."""

    backend: str = "python"  # "python" | "onnxruntime" | "tensorrt"
    kind: str = "KIND_CPU"
    count: int = 1
    artifact: str | None = None  # file in the version folder (model.onnx / model.plan)
    parameters: dict[str, str] = field(default_factory=dict)
    trt_accelerator: bool = False  # ORT's TensorRT execution accelerator (fp16)


@dataclass(frozen=True)
class ModelDef:
    name: str
    doc: str
    inputs: tuple[T, ...]
    outputs: tuple[T, ...]
    max_batch_size: int = 0
    queue_delay_us: int | None = None  # dynamic batching when set
    parameters: dict[str, str] = field(default_factory=dict)
    cpu: Serving | None = Serving()
    gpu: Serving | None = Serving()
    decoupled: bool = False  # streams several responses per request

    def serving(self, target: Target) -> Serving | None:
        return self.cpu if target == "cpu" else self.gpu


def _mtcnn_net(name: str, inputs: tuple[T, ...], outputs: tuple[T, ...]) -> ModelDef:
    return ModelDef(
        name=f"mtcnn_{name}",
        doc=f"MTCNN {name.upper()} (GPU target: called by face_detector's cascade over BLS).",
        inputs=inputs,
        outputs=outputs,
        max_batch_size=0,
        cpu=None,
        gpu=Serving(backend="onnxruntime", kind="KIND_GPU", artifact="model.onnx"),
    )


MODELS: tuple[ModelDef, ...] = (
    ModelDef(
        name="tokenizer",
        doc="CLIP BPE tokenizer (SD-1.5 convention: BOS, <=75 tokens, EOS, EOS padding).\n"
        "One request carries N prompts; cheap, so no dynamic batching.",
        inputs=(T("prompt", "STRING", (-1,)),),
        outputs=(T("input_ids", "INT32", (-1, 77)),),
    ),
    ModelDef(
        name="face_detector",
        doc="MTCNN face detector. Per image: boxes [K,4] (x1,y1,x2,y2 px), scores [K],\n"
        "landmarks [K,5,2] (left eye, right eye, nose, mouth left, mouth right), padded\n"
        "to the request's largest K; num_faces says how many rows are real.\n"
        "cpu: P/R/O-net in ONNX Runtime in-process; gpu: nets are mtcnn_* models (BLS).",
        inputs=(T("images", "UINT8", (-1, -1, 3)),),
        outputs=(
            T("boxes", "FP32", (-1, 4)),
            T("scores", "FP32", (-1,)),
            T("landmarks", "FP32", (-1, 5, 2)),
            T("num_faces", "INT32", (1,)),
        ),
        max_batch_size=64,
        queue_delay_us=2000,
        parameters={"min_face_size": "20"},
        cpu=Serving(parameters={"nets": "onnxruntime", "intra_op_threads": "2"}),
        gpu=Serving(parameters={"nets": "bls"}),
    ),
    _mtcnn_net("pnet", (T("images", "FP32", (-1, 3, -1, -1)),), (T("offsets", "FP32", (-1, 4, -1, -1)), T("probs", "FP32", (-1, 2, -1, -1)))),
    _mtcnn_net("rnet", (T("images", "FP32", (-1, 3, 24, 24)),), (T("offsets", "FP32", (-1, 4)), T("probs", "FP32", (-1, 2)))),
    _mtcnn_net(
        "onet",
        (T("images", "FP32", (-1, 3, 48, 48)),),
        (T("offsets", "FP32", (-1, 4)), T("landmarks", "FP32", (-1, 10)), T("probs", "FP32", (-1, 2))),
    ),
    ModelDef(
        name="face_embedder",
        doc="dlib ResNet (ported): aligned 150x150 chips -> 128-D. embeddings: L2-normalised\n"
        "(cosine similarity); descriptors: dlib's raw vectors (distance < 0.6 = same person).",
        inputs=(T("faces", "UINT8", (150, 150, 3)),),
        outputs=(T("embeddings", "FP32", (128,)), T("descriptors", "FP32", (128,))),
        max_batch_size=64,
        queue_delay_us=2000,
        cpu=Serving(parameters={"intra_op_threads": "2"}),
        gpu=Serving(backend="onnxruntime", kind="KIND_GPU", artifact="model.onnx", trt_accelerator=True),
    ),
    ModelDef(
        name="face_select",
        doc="Rank candidate portraits by identity (BLS over face_detector + face_embedder).\n"
        "One candidate set per request. Reference: reference_embedding FP32[1,128] or\n"
        "user_id (user registry). Outputs: images = top_k survivors best first;\n"
        "similarity/rank per input candidate (rank 0 = best; -1 and NaN = filtered: not\n"
        "exactly one face within size bounds); selected = input indices of the images.",
        inputs=(
            T("images", "UINT8", (-1, -1, -1, 3)),
            T("reference_embedding", "FP32", (1, 128), optional=True),
            T("user_id", "STRING", (1,), optional=True),
            T("top_k", "INT32", (1,), optional=True),
        ),
        outputs=(
            T("images", "UINT8", (-1, -1, -1, 3)),
            T("similarity", "FP32", (-1,)),
            T("rank", "INT32", (-1,)),
            T("selected", "INT32", (-1,)),
        ),
        parameters={"min_face_frac": "0.08", "max_face_frac": "0.95", "min_score": "0.9", "users_dir": ""},
    ),
)


# --- diffusion -------------------------------------------------------------------------
# Artifacts (ONNX) come from `facetron export onnx` of the base model; the cpu
# target runs them in ONNX Runtime inside python models, the gpu target on
# native backends. `unet` is the runtime-LoRA UNet (one graph for all users):
# on cpu its python model keeps a bounded LRU bank of users' LoRA tensors and
# applies each batch item's user, so requests of different users share a
# batch and no user needs a reload (ARCHITECTURE.md, serving mode 2).
_PORTRAIT_INPUTS = (
    T("prompt", "STRING", (1,), optional=True),
    T("negative_prompt", "STRING", (1,), optional=True),
    T("style", "STRING", (1,), optional=True),
    T("user_id", "STRING", (1,), optional=True),
    T("num_images", "INT32", (1,), optional=True),
    T("seed", "INT64", (1,), optional=True),
    T("steps", "INT32", (1,), optional=True),
    T("guidance", "FP32", (1,), optional=True),
    T("height", "INT32", (1,), optional=True),
    T("width", "INT32", (1,), optional=True),
    T("scheduler", "STRING", (1,), optional=True),
    T("template", "UINT8", (-1, -1, 3), optional=True),
    T("strength", "FP32", (1,), optional=True),
)

DIFFUSION_MODELS: tuple[ModelDef, ...] = (
    ModelDef(
        name="text_encoder",
        doc="CLIP text encoder: token ids -> last_hidden_state [77, C].",
        inputs=(T("input_ids", "INT32", (77,)),),
        outputs=(T("last_hidden_state", "FP32", (77, -1)),),
        max_batch_size=16,
        queue_delay_us=1000,
        cpu=Serving(artifact="model.onnx", parameters={"intra_op_threads": "2"}),
        gpu=Serving(backend="onnxruntime", kind="KIND_GPU", artifact="model.onnx", trt_accelerator=True),
    ),
    ModelDef(
        name="unet",
        doc="Runtime-LoRA UNet: noise prediction for each batch item with that item's user's\n"
        "LoRA (user_id; empty = base model) and style LoRA (style), from an LRU bank.",
        inputs=(
            T("sample", "FP32", (-1, -1, -1)),
            T("timestep", "FP32", (1,)),
            T("encoder_hidden_states", "FP32", (77, -1)),
            T("user_id", "STRING", (1,), optional=True),
            T("style", "STRING", (1,), optional=True),
        ),
        outputs=(T("noise_pred", "FP32", (-1, -1, -1)),),
        max_batch_size=32,
        queue_delay_us=1000,
        parameters={"lora_cache_mb": "512", "users_dir": "", "w_face": "0.9", "w_style": "0.25"},
        cpu=Serving(artifact="model.onnx", parameters={"intra_op_threads": "2", "providers": "cpu"}),
        # gpu: the same LoRA-bank python model, ONNX Runtime on its CUDA provider (merged
        # mode's analogue there is a refit-enabled TensorRT engine: export/trt.py)
        gpu=Serving(kind="KIND_GPU", artifact="model.onnx", parameters={"intra_op_threads": "0", "providers": "cuda"}),
    ),
    ModelDef(
        name="vae_decoder",
        doc="VAE decoder: scaled latent [4, h, w] -> RGB image UINT8 [8h, 8w, 3].",
        inputs=(T("latent", "FP32", (-1, -1, -1)),),
        outputs=(T("images", "UINT8", (-1, -1, 3)),),
        max_batch_size=8,
        queue_delay_us=1000,
        cpu=Serving(artifact="model.onnx", parameters={"intra_op_threads": "2"}),
        gpu=Serving(backend="onnxruntime", kind="KIND_GPU", artifact="model.onnx", trt_accelerator=True),
    ),
    ModelDef(
        name="vae_encoder",
        doc="VAE encoder (template mode): RGB image UINT8 [H, W, 3] -> scaled latent mean.",
        inputs=(T("images", "UINT8", (-1, -1, 3)),),
        outputs=(T("latent", "FP32", (-1, -1, -1)),),
        max_batch_size=8,
        queue_delay_us=1000,
        cpu=Serving(artifact="model.onnx", parameters={"intra_op_threads": "2"}),
        gpu=Serving(backend="onnxruntime", kind="KIND_GPU", artifact="model.onnx", trt_accelerator=True),
    ),
    ModelDef(
        name="portrait_generator",
        doc="Portraits for a user (BLS): tokenizer -> text_encoder -> denoising loop over unet\n"
        "(DPM-Solver multistep default; euler, ddim) -> vae_decoder. Template mode with\n"
        "template (+ strength): the template's face region is re-generated. Deterministic\n"
        "for a fixed seed (image i uses seed + i).",
        inputs=_PORTRAIT_INPUTS,
        outputs=(T("images", "UINT8", (-1, -1, -1, 3)),),
        parameters={"users_dir": "", "max_images": "16", "default_steps": "25", "default_guidance": "7.0",
                    "identity_mode": "runtime_lora"},
    ),
    ModelDef(
        name="portrait",
        doc="The one call a client makes (BLS): portrait_generator -> fuse the user's template\n"
        "face (classical, pluggable) -> face_select. images = top_k best first; similarity /\n"
        "rank per generated candidate (rank -1, NaN = filtered); report = JSON (stage\n"
        "timings, which parts came from the tiny smoke model).",
        inputs=_PORTRAIT_INPUTS + (T("top_k", "INT32", (1,), optional=True), T("fuse", "BOOL", (1,), optional=True)),
        outputs=(
            T("images", "UINT8", (-1, -1, -1, 3)),
            T("similarity", "FP32", (-1,)),
            T("rank", "INT32", (-1,)),
            T("selected", "INT32", (-1,)),
            T("report", "STRING", (1,)),
        ),
        parameters={"users_dir": ""},
    ),
    ModelDef(
        name="portrait_stream",
        doc="portrait with progress (decoupled, over a gRPC stream): one response per denoising\n"
        "step with progress = [done, total], then the final response with portrait's outputs.",
        inputs=_PORTRAIT_INPUTS + (T("top_k", "INT32", (1,), optional=True), T("fuse", "BOOL", (1,), optional=True)),
        outputs=(
            T("progress", "INT32", (2,)),
            T("images", "UINT8", (-1, -1, -1, 3)),
            T("similarity", "FP32", (-1,)),
            T("rank", "INT32", (-1,)),
            T("selected", "INT32", (-1,)),
            T("report", "STRING", (1,)),
        ),
        parameters={"users_dir": "", "max_images": "16", "default_steps": "25", "default_guidance": "7.0",
                    "identity_mode": "runtime_lora"},
        decoupled=True,
    ),
)

MERGED_UNET_PREFIX = "unet_user_"


def merged_unet_def(user_id: str) -> ModelDef:
    """Serving mode 1: one user's merged UNet, a model of its own (code: unet_merged)."""
    return ModelDef(
        name=f"{MERGED_UNET_PREFIX}{user_id}",
        doc=f"Merged UNet of user {user_id!r} (face + style LoRA fused; serving mode 1).",
        inputs=(T("sample", "FP32", (-1, -1, -1)), T("timestep", "FP32", (1,)), T("encoder_hidden_states", "FP32", (77, -1))),
        outputs=(T("noise_pred", "FP32", (-1, -1, -1)),),
        max_batch_size=32,
        queue_delay_us=1000,
        cpu=Serving(artifact="model.onnx", parameters={"intra_op_threads": "2", "providers": "cpu"}),
        gpu=Serving(kind="KIND_GPU", artifact="model.onnx", parameters={"intra_op_threads": "0", "providers": "cuda"}),
    )


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
    if model.decoupled:
        cfg.model_transaction_policy.decoupled = True
    if serving.trt_accelerator:
        acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add()
        acc.name = "tensorrt"
        acc.parameters["precision_mode"] = "FP16"
        acc.parameters["max_workspace_size_bytes"] = str(1 << 30)
    params = {**model.parameters, **serving.parameters}
    params.update({k: v for k, v in (parameters or {}).items() if k in params})
    for key, value in params.items():
        cfg.parameters[key].string_value = value
    return cfg


def render(model: ModelDef, target: Target, parameters: dict[str, str] | None = None) -> str:
    """``config.pbtxt`` text: a comment header + the protobuf in text format."""
    from google.protobuf import text_format

    header = "".join(f"# {line}\n" for line in model.doc.splitlines())
    header += f"# Generated by `facetron export repository --target {target}` from export/model_configs.py.\n"
    return header + text_format.MessageToString(to_proto(model, target, parameters))


def models_for(target: Target, diffusion: bool = False) -> list[ModelDef]:
    """Models served on ``target``: the face stack + tokenizer, plus the
    diffusion models when ``diffusion`` (they need exported artifacts)."""
    pool = ALL_MODELS if diffusion else MODELS
    return [m for m in pool if m.serving(target) is not None]
