"""The served contract, in one place: model names, tensors, request limits,
defaults and each served model's parameters.

Everyone reads it: the Triton models (``facetron.serving``), the config
renderer (``facetron.export.model_configs`` adds only per-target serving
details), the client, the CLI and the demo. Change a name, a limit or a
default here and every side follows; a test keeps the checked-in configs
equal to what this module renders.

Conventions (docs/ARCHITECTURE.md): tensor names are lower_snake_case;
images cross the wire as ``UINT8 [N,H,W,3]`` RGB; embeddings are ``FP32
[N,128]`` L2-normalised. ``dims`` exclude the batch dimension when a model
batches (``max_batch_size > 0``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Mapping

from facetron.errors import InvalidInputError

# --- tensors ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Tensor:
    """A tensor of a model's contract (dims exclude the batch dim when batching)."""

    name: str
    dtype: str  # Triton type without TYPE_: UINT8, FP32, INT32, INT64, STRING, BOOL
    dims: tuple[int, ...]
    optional: bool = False


# --- limits and defaults (one place; the client checks the same rules early) -----------

TOKENS = 77  # CLIP context length (SD-1.5)
VOCAB_SIZE = 49408  # CLIP BPE vocabulary: token ids are 0..VOCAB_SIZE-1
MIN_LATENT_SIDE = 4  # UNet sample / latent: smallest side in latent cells (32 px)
EMBEDDING_DIM = 128  # face_embedder output
CHIP_SIZE = 150  # aligned face chip side (dlib's layout)
FACE_NET_MAX_BATCH = 64  # face_detector / face_embedder max_batch_size
MAX_CANDIDATES = 64  # face_select: images per candidate set
MIN_CANDIDATE_SIDE = 16  # face_select: smallest candidate image side (px)
MAX_PROMPTS = 256  # tokenizer: prompts per request
MAX_PROMPT_BYTES = 16384  # tokenizer: bytes per prompt
MAX_IMAGES = 16  # portrait: images per request
MAX_STEPS = 150
MAX_GUIDANCE = 30.0
MAX_SIDE = 2048  # height / width (px)
MIN_TEMPLATE_SIDE = 32
MAX_TEMPLATE_SIDE = 4096  # template photos: larger sides are refused (copied at every hop)
MAX_IMAGE_SIDE = 4096  # face_detector / face_select images
MIN_DETECT_SIDE = 12  # MTCNN's smallest input side (P-net's 12x12 window)
MAX_SIDE_FACTOR = 2.0  # height/width at most this x the base model's native resolution
MAX_WORK = 400.0  # num_images x steps x (height x width / native^2): "native image-steps" per request
UNET_MAX_BATCH_CELLS = 8 * 64 * 64  # latent cells per UNet call (8 items at SD-1.5's 64x64)
SCHEDULERS = ("dpmsolver", "euler", "ddim", "lcm", "tcd")
DEFAULT_SCHEDULER = "dpmsolver"
#: few-step schedulers (diffusers' LCMScheduler / TCDScheduler): made for an LCM / TCD-distilled model or a
#: distillation LoRA (LCM-LoRA, TCD-LoRA), recommended at 4-8 steps and guidance 1-2 (guidance <= 1 runs no
#: negative branch); on a plain SD model they give poor pictures at 4 steps. Both draw fresh noise between
#: steps, image i from its own generator (seed + i). Their timesteps are a subset of a 50-step schedule
#: (diffusers' ``original_inference_steps``), so they take at most FEW_STEP_MAX_STEPS steps.
FEW_STEP_SCHEDULERS = ("lcm", "tcd")
FEW_STEP_MAX_STEPS = 50
#: what a few-step request that leaves them out runs with (the server's default_steps / default_guidance are
#: for the 25-step path): 4 steps without a negative branch, LCM-LoRA's and TCD's recommended setting
FEW_STEP_DEFAULT_STEPS = 4
FEW_STEP_DEFAULT_GUIDANCE = 1.0
#: a distillation LoRA (``export repository --distill-lora FILE``) is merged into the served ``unet_fewstep`` at
#: this weight unless ``--distill-weight`` says otherwise (diffusers' LCM-LoRA / TCD / Hyper-SD docs load them at 1)
DEFAULT_DISTILL_WEIGHT = 1.0
#: model_info.json's record of that LoRA (file, hash, weight; null = the repository serves no unet_fewstep)
DISTILL_INFO = "distill_lora"
#: TCD's gamma (stochasticity per step, 0 = deterministic): TCDScheduler.step's default and the value diffusers'
#: TCD docs use; fixed, not a request input
TCD_ETA = 0.3
DEFAULT_STEPS = 25
#: the autoencoder that decodes (and in template mode encodes) a request's latents: the base model's full VAE
#: (``vae_decoder`` / ``vae_encoder``) or a tiny one (diffusers' AutoencoderTiny, TAESD: ``vae_decoder_tiny`` /
#: ``vae_encoder_tiny``, served only by a repository assembled with ``export repository --tiny-vae DIR``)
VAE_CHOICES = ("full", "tiny")
DEFAULT_VAE = "full"
#: template mode's ControlNet conditioning (``export repository --controlnet DIR``: a diffusers ControlNetModel
#: served as ``controlnet``; pipeline.control builds the image from the fitted template): none, or canny edges
#: (cv2.Canny at diffusers' example thresholds). No pose: no keypoint model ships in the installed packages.
CONTROL_CHOICES = ("none", "canny")
DEFAULT_CONTROL = "none"
DEFAULT_CONTROL_SCALE = 1.0  # diffusers' ControlNetModel.forward default (its inpaint pipeline's __call__ says 0.5)
MAX_CONTROL_SCALE = 2.0
#: the ControlNet's residuals: one per down-block residual of the UNet (SD-1.5: 12; a smaller UNet has fewer and
#: uses the first ones) + the mid block's, added to the UNet's (diffusers' down_block_additional_residuals /
#: mid_block_additional_residual)
MAX_CONTROL_RESIDUALS = 12
CONTROL_DOWN_RESIDUALS = tuple(f"down_block_residual_{i}" for i in range(MAX_CONTROL_RESIDUALS))
CONTROL_MID_RESIDUAL = "mid_block_residual"
#: step caching (DeepCache, facetron.diffusion.step_cache): a full UNet every ``cache_interval`` steps, the
#: shallow graph on the cached deep feature between (1 = off, the uncached loop exactly)
DEFAULT_CACHE_INTERVAL = 1
MAX_CACHE_INTERVAL = 5
DEEP_FEATURE = "deep_feature"  # unet: output of a full step, input of a shallow one
DEFAULT_GUIDANCE = 7.0
DEFAULT_STRENGTH = 0.6  # template mode: share of the template re-generated
DEFAULT_FUSION_STRENGTH = 0.5  # portrait: weight of the user's photo in the face blend (0 = no fusion, 1 = full)
DEFAULT_NUM_IMAGES = 1  # server side; the client asks for 4 candidates by default
CLIENT_NUM_IMAGES = 4
LATENT_FACTOR = 8  # SD-1.5 VAE: pixels per latent cell
#: io.json key of every exported graph that takes a UNet ``sample`` (unet, its shallow and control graphs,
#: unet_fewstep, unet_inpaint, controlnet, unet_user_<id>): the UNet's down factor, 2 ** (len(block_out_channels)
#: - 1) (8 for SD-1.5, 2 for the tiny default). The graph's skip connections concatenate at fixed halvings: a
#: sample's sides must be multiples of it, a request's sides multiples of LATENT_FACTOR x it (64 px for SD-1.5)
UNET_DOWN_FACTOR = "unet_down_factor"
#: a graph exported before the factor was recorded: SD-1.5's, which every SD-1.5-architecture UNet divides
#: (the tiny default's 2 included: re-export such a repository to serve its sides that are not multiples of 8 cells)
DEFAULT_UNET_DOWN_FACTOR = 8
LATENT_CHANNELS = 4  # SD-1.5 latent channels: the unet's sample / noise_pred and the VAEs' latent (a fixed config dim)
#: Budgets of the served nets, checked per request before any work (facetron.pipeline.net_io) and per
#: dynamic batch (facetron.triton.batching.run_batched runs a batch over its budget as several calls).
MAX_LATENT_SIDE = MAX_SIDE // LATENT_FACTOR  # unet / vae_decoder: a latent side (256 cells = MAX_SIDE px)
#: latent cells per VAE item: a 1024x1024 image (MAX_SIDE_FACTOR x SD-1.5's native 512, the largest a public
#: SD-1.5 generation sends). The VAE's mid-block self-attention holds (h*w)^2 floats per item: 1 GiB here, 16 GiB
#: for a 2048x2048 image (measured: a 2x4x256x256 latent asks ONNX Runtime for 32 GiB). Pixels: x LATENT_FACTOR^2.
VAE_MAX_ITEM_CELLS = (MAX_SIDE // 2 // LATENT_FACTOR) ** 2
#: latent cells per VAE call: 2 such items (8 at SD-1.5's 512x512, as many as UNET_MAX_BATCH_CELLS). The
#: generator sends its VAE work in calls of at most this many cells (vae_chunk); 8 items at 1024x1024 in one
#: call held the tiny model's vae_decoder for 66.5 s on 2 cores, a quarter of that now
VAE_MAX_BATCH_CELLS = 2 * VAE_MAX_ITEM_CELLS
#: face_detector / face_select: pixels per request (16.8 Mpx): MAX_IMAGES candidates at 1024x1024 (a public
#: SD-1.5 portrait's largest candidate set) or one MAX_TEMPLATE_SIDE template. face_embedder's chips are
#: bounded by its config (max_batch_size FACE_NET_MAX_BATCH x CHIP_SIZE^2, refused by Triton itself).
MAX_REQUEST_PIXELS = MAX_TEMPLATE_SIDE * MAX_TEMPLATE_SIDE
#: tokenizer: a word (one piece of CLIP's pattern) longer than this is tokenized as pieces of at most
#: this many bytes (split on a character boundary, not refused); and the bytes of all prompts of a request
MAX_WORD_BYTES = 256
MAX_TOKENIZER_REQUEST_BYTES = 4 * MAX_PROMPT_BYTES
MAX_SEED = 2**63 - 1
BLS_TIMEOUT_S = 300.0  # a model's call to another model of the same server gives up after this in its queue
#: Triton's non-inference APIs (facetron.triton.server.RESTRICTED_APIS) sit behind an admin key: its name is the
#: HTTP header itself and the key given to --grpc-restricted-protocol; tritonserver (2.51, checked by a real
#: request in tests/test_launch_commands.py) reads the gRPC key from metadata named with the prefix below
ADMIN_HEADER = "facetron-admin-key"
GRPC_ADMIN_HEADER = "triton-grpc-protocol-" + ADMIN_HEADER
ADMIN_KEY_ENV = "FACETRON_ADMIN_KEY"  # where the launcher and the client read the key (else a key file / none)
#: a caller's per-user secret (facetron.users: issued at registration, `facetron users token`): sent as this gRPC
#: header (Triton forwards it to the model as a request parameter, ``--grpc-header-forward-pattern``) or as a
#: request parameter of this name; BLS calls pass it on as a parameter
USER_TOKEN_HEADER = "facetron-user-token"
#: "off" on the server turns the per-user token check off (single-user local use; `facetron serve --no-user-tokens`)
USER_TOKENS_ENV = "FACETRON_USER_TOKENS"
#: merged mode's server-wide LRU: the ledger file every model process of one server shares (set by the launcher:
#: /dev/shm/<the server's shm prefix>merged-lru.json, removed with its regions); unset = one LRU per process
MERGED_LEDGER_ENV = "FACETRON_MERGED_LEDGER"
#: the operator's token store (raw tokens, one file per user; facetron.token_store), else <data root>/tokens
TOKENS_DIR_ENV = "FACETRON_TOKENS_DIR"
#: set by a process that runs facetron commands as its stages (the web app): the stage ends when that process
#: dies, even by SIGKILL (facetron.cli.conventions.end_with_parent)
PARENT_PID_ENV = "FACETRON_PARENT_PID"
IDENTITY_MODES = ("runtime_lora", "merged")
#: Runtimes of a served net on the cpu target (facetron.net_runtimes); the
#: ``runtime`` parameter of NetParams / UnetParams ("openvino" falls back to
#: ONNX Runtime, with a log line, where OpenVINO cannot run the net).
NET_RUNTIMES = ("onnxruntime", "openvino")
DEFAULT_NET_RUNTIME = "onnxruntime"
#: OpenVINO inference precision: f32 (exact within export tolerances) or bf16
#: (~4x faster UNet steps on CPUs with AMX, slower without; chosen by
#: ``export repository --precision auto`` where its image deviates like torch's
#: own bf16, facetron.export.runtime_choice). ONNX Runtime always runs f32.
NET_PRECISIONS = ("f32", "bf16")
DEFAULT_NET_PRECISION = "f32"
#: the served UNet as an int8 OpenVINO IR (facetron.export.quantize, in ``<unet version>/int8/``): off
#: (default: full int8 deviates ~4x more than bf16 on the measured models) | weights | full | hybrid
INT8_MODES = ("off", "weights", "full", "hybrid")
INT8_FOLDER = "int8"
#: Styles (facetron.style_registry): a name like a user id; a style LoRA's weight in 0..MAX_STYLE_WEIGHT
#: (FaceChain blends styles at 0.25-0.5; above 2 a LoRA overwhelms the base model);
#: DEFAULT_STYLE_WEIGHT is the unet model's w_style, used when a style gives none.
STYLE_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
MAX_STYLE_WEIGHT = 2.0
DEFAULT_STYLE_WEIGHT = 0.25
#: the face LoRA's weight: the runtime-LoRA unet / text_encoder banks (keep both equal) and a merge
DEFAULT_W_FACE = 0.9
#: face_select's rule "exactly one face within size bounds" (facetron.faces.select.SelectRules): a face
#: counts when its detection score reaches MIN_FACE_SCORE and its area is at least BYSTANDER_AREA of the
#: largest face's (smaller ones are background; a template's subject is chosen among the same faces); the
#: one face's box short side must lie within MIN_FACE_FRAC..MAX_FACE_FRAC of the image's short side.
MIN_FACE_FRAC = 0.08
MAX_FACE_FRAC = 0.95
MIN_FACE_SCORE = 0.9  # also the face detector's floor on MTCNN's final (ONet) score
BYSTANDER_AREA = 0.25
MTCNN_MIN_FACE_SIZE = 20.0  # px: the smallest face MTCNN's pyramid looks for (facenet-pytorch's default)
VERSION_FOLDER = "1"  # a served model's one version folder: <repository>/<model>/1/ (the artifacts below)

#: Serving mode 1: one user's merged UNet is the model ``unet_user_<id>``
#: (its code is the source folder ``model_repository/unet_user``).
MERGED_UNET_PREFIX = "unet_user_"
MERGED_UNET_SOURCE = "unet_user"
MERGE_INFO = "facetron_merge.json"  # what went into a merge (+ the user's registry version), in its version folder
#: Artifact names. A served net's version folder ``<model>/1/`` holds MODEL_FILE (+ ``model.onnx.data``,
#: ``io.json``, ``lora_manifest.json``); the ``unet``'s step-cache shallow graph is in SHALLOW_FOLDER under it,
#: its int8 IR in INT8_FOLDER (INT8_DEVIATION beside). The export work folder
#: (facetron.export.diffusion_source) has the same layout under the served names: ``<export>/unet/``,
#: ``<export>/unet/shallow/``, ``<export>/unet/int8/``, ``<export>/text_encoder/``, ...
MODEL_FILE = "model.onnx"
IO_FILE = "io.json"  # each exported graph's tensors and records (UNET_DOWN_FACTOR), beside MODEL_FILE
SHALLOW_FOLDER = "shallow"
#: the ``unet``'s graph that takes the ControlNet's residuals (opened on first use), beside the shallow graph;
#: CONTROL_LAYOUT (in it and in ``controlnet/1/``): each residual's channels and pixels-per-cell factor
CONTROL_FOLDER = "control"
CONTROL_LAYOUT = "control_residuals.json"
INT8_DEVIATION = "deviation.json"  # the int8 IR's deviation from fp32 on held-out generations, and the verdict
#: portrait_generator's version folder: the base model the repository was assembled from, its scheduler's config
MODEL_INFO = "model_info.json"
SCHEDULER_CONFIG = "scheduler_config.json"


USER_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


class UserId(str):
    """A user id that :func:`validate_user_id` accepted: checked once, where a
    request is parsed; the registry and the rest of the call take it as it is."""


def validate_user_id(user_id: object, name: str = "user_id") -> UserId:
    """``user_id`` if it is 1-64 characters of [A-Za-z0-9_-] starting
    alphanumeric, matched in full (no trailing newline), else InvalidInputError.
    Ids come from requests: they are checked before any path is built. An id
    already checked (a :class:`UserId`) is returned as it is."""
    if isinstance(user_id, UserId):
        return user_id
    if not isinstance(user_id, str) or not USER_ID_PATTERN.fullmatch(user_id):
        raise InvalidInputError(
            name, f"{user_id!r} is not a valid user id (1-64 characters from A-Z a-z 0-9 _ -, starting alphanumeric)"
        )
    return UserId(user_id)


def check_seed(seed: int, name: str = "seed") -> int:
    if not 0 <= seed <= MAX_SEED:
        raise InvalidInputError(name, f"must be in 0..{MAX_SEED}, got {seed}")
    return seed


def check_budget(*, num_images: int, steps: int, height: int, width: int, native: int,
                 max_side_factor: float = MAX_SIDE_FACTOR, max_work: float = MAX_WORK) -> None:
    """A request's size and compute budget against the base model's native
    resolution (a 4x-native request would need ~16x the attention memory)."""
    limit = min(MAX_SIDE, int(max_side_factor * native) // LATENT_FACTOR * LATENT_FACTOR)
    for name, v in (("height", height), ("width", width)):
        if v > limit:
            raise InvalidInputError(name, f"{v} px is over this server's limit of {limit} px "
                                          f"({max_side_factor:g} x the base model's native {native} px)")
    work = num_images * steps * height * width / float(native * native)
    if work > max_work:
        raise InvalidInputError("num_images", f"num_images x steps x (height x width / {native}^2) = {work:g} is over "
                                              f"this server's compute budget of {max_work:g} per request")


def cells_chunk(height_cells: int, width_cells: int, max_batch: int, budget: int) -> int:
    """Items per call so one call of ``height_cells x width_cells`` latents stays within ``budget`` cells."""
    return max(1, min(max_batch, budget // max(1, height_cells * width_cells)))


def unet_chunk(height_cells: int, width_cells: int, max_batch: int) -> int:
    """Items per UNet call so one call stays within UNET_MAX_BATCH_CELLS latent cells."""
    return cells_chunk(height_cells, width_cells, max_batch, UNET_MAX_BATCH_CELLS)


def vae_chunk(height_cells: int, width_cells: int, max_batch: int) -> int:
    """Items per VAE call so one call stays within VAE_MAX_BATCH_CELLS latent cells."""
    return cells_chunk(height_cells, width_cells, max_batch, VAE_MAX_BATCH_CELLS)


def merged_unet_name(user_id: str) -> str:
    return f"{MERGED_UNET_PREFIX}{validate_user_id(user_id)}"


def check_generation(
    *,
    num_images: int,
    steps: int,
    guidance: float,
    height: int,
    width: int,
    strength: float,
    scheduler: str,
    latent_factor: int = LATENT_FACTOR,
    max_images: int = MAX_IMAGES,
    cache_interval: int = DEFAULT_CACHE_INTERVAL,
) -> None:
    """The rules of a generation request, each error naming its input."""
    if not 1 <= num_images <= max_images:
        raise InvalidInputError("num_images", f"must be 1..{max_images}, got {num_images}")
    if not 1 <= steps <= MAX_STEPS:
        raise InvalidInputError("steps", f"must be 1..{MAX_STEPS}, got {steps}")
    if not math.isfinite(guidance) or not 0.0 <= guidance <= MAX_GUIDANCE:
        raise InvalidInputError("guidance", f"must be in 0..{MAX_GUIDANCE:g}, got {guidance}")
    for name, v in (("height", height), ("width", width)):
        if v % latent_factor or not latent_factor * 4 <= v <= MAX_SIDE:
            raise InvalidInputError(name, f"must be a multiple of {latent_factor} in {latent_factor * 4}..{MAX_SIDE}, got {v}")
    if not 0.0 < strength <= 1.0:
        raise InvalidInputError("strength", f"must be in (0, 1], got {strength}")
    if scheduler not in SCHEDULERS:
        raise InvalidInputError("scheduler", f"expected one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
    if scheduler in FEW_STEP_SCHEDULERS and steps > FEW_STEP_MAX_STEPS:
        raise InvalidInputError("steps", f"must be 1..{FEW_STEP_MAX_STEPS} with scheduler {scheduler!r}, got {steps}")
    if not 1 <= cache_interval <= MAX_CACHE_INTERVAL:
        raise InvalidInputError("cache_interval", f"must be 1..{MAX_CACHE_INTERVAL} (1 = no step caching), "
                                                  f"got {cache_interval}")


def check_model_sides(height: int, width: int, latent_factor: int, down_factor: int) -> None:
    """A request's sides against the deployed model: multiples of ``latent_factor`` (px per latent cell)
    x ``down_factor`` (the UNet's, :data:`UNET_DOWN_FACTOR`): 64 px for SD-1.5, 16 px for the tiny default."""
    multiple = latent_factor * down_factor
    for name, v in (("height", height), ("width", width)):
        if v % multiple:
            raise InvalidInputError(name, f"must be a multiple of {multiple} for this model ({latent_factor} px per "
                                          f"latent cell x its UNet's down factor {down_factor}), got {v}")


def check_fusion_strength(value: float, name: str = "fusion_strength") -> float:
    """``fusion_strength`` in [0, 1] (0 = no fusion), else InvalidInputError."""
    s = float(value)
    if not (math.isfinite(s) and 0.0 <= s <= 1.0):
        raise InvalidInputError(name, f"must be in [0, 1] (0 = no fusion), got {value}")
    return s


def check_control(control: str, control_scale: float) -> None:
    """Template mode's ControlNet choice: ``control`` in CONTROL_CHOICES, ``control_scale`` in
    [0, MAX_CONTROL_SCALE], each error naming its input."""
    if control not in CONTROL_CHOICES:
        raise InvalidInputError("control", f"expected one of {', '.join(CONTROL_CHOICES)}, got {control!r}")
    if not (math.isfinite(control_scale) and 0.0 <= control_scale <= MAX_CONTROL_SCALE):
        raise InvalidInputError("control_scale", f"must be in [0, {MAX_CONTROL_SCALE:g}], got {control_scale}")


# --- model parameters (config.pbtxt ``parameters``, typed) ------------------------------


@dataclass(frozen=True)
class ModelParams:
    """Base of each served model's parameters: typed fields with defaults,
    rendered into ``config.pbtxt`` as strings and read back in ``initialize``."""

    @classmethod
    def from_config(cls, raw: Mapping[str, str]) -> "ModelParams":
        """From ``config.pbtxt`` strings (absent or empty = the default)."""
        values = {}
        for f in dataclasses.fields(cls):
            text = raw.get(f.name, "")
            if text == "":
                continue
            kind = type(f.default)
            try:
                values[f.name] = (text.lower() in ("1", "true", "yes")) if kind is bool else kind(text)
            except ValueError:
                raise InvalidInputError(f"parameter {f.name}", f"expected {kind.__name__}, got {text!r}") from None
        return cls(**values)

    def to_config(self) -> dict[str, str]:
        return {f.name: _param_text(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _param_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


@dataclass(frozen=True)
class NoParams(ModelParams):
    pass


@dataclass(frozen=True)
class NetParams(ModelParams):
    """An ONNX net in a python model: threads and execution provider."""

    intra_op_threads: int = 2  # 0 = ONNX Runtime's default
    providers: str = "cpu"  # "cpu" | "cuda"
    runtime: str = DEFAULT_NET_RUNTIME  # NET_RUNTIMES
    precision: str = DEFAULT_NET_PRECISION  # NET_PRECISIONS (OpenVINO only)


@dataclass(frozen=True)
class FaceDetectorParams(ModelParams):
    min_face_size: float = MTCNN_MIN_FACE_SIZE
    nets: str = "onnxruntime"  # "onnxruntime" (in-process) | "bls" (mtcnn_* models)
    intra_op_threads: int = 2


@dataclass(frozen=True)
class FaceEmbedderParams(ModelParams):
    intra_op_threads: int = 2


@dataclass(frozen=True)
class FaceSelectParams(ModelParams):
    min_face_frac: float = MIN_FACE_FRAC
    max_face_frac: float = MAX_FACE_FRAC
    min_score: float = MIN_FACE_SCORE
    users_dir: str = ""  # "" = the default registry root


@dataclass(frozen=True)
class UnetParams(ModelParams):
    intra_op_threads: int = 2
    providers: str = "cpu"
    runtime: str = DEFAULT_NET_RUNTIME  # NET_RUNTIMES
    precision: str = DEFAULT_NET_PRECISION  # NET_PRECISIONS (OpenVINO only)
    int8: str = "off"  # INT8_MODES: OpenVINO runs <version>/int8/model.xml (the shallow step-cache graph stays f32)
    users_dir: str = ""
    lora_cache_mb: float = 512.0
    w_face: float = DEFAULT_W_FACE
    w_style: float = DEFAULT_STYLE_WEIGHT  # a style LoRA's weight when its style gives none


@dataclass(frozen=True)
class TextEncoderParams(ModelParams):
    """The runtime-LoRA text encoder: its runtime and its LoRA bank (the face
    LoRA's text-encoder layers at ``w_face``, as the UNet's; keep both equal)."""

    intra_op_threads: int = 2
    providers: str = "cpu"
    runtime: str = DEFAULT_NET_RUNTIME  # NET_RUNTIMES
    precision: str = DEFAULT_NET_PRECISION  # NET_PRECISIONS (OpenVINO only)
    users_dir: str = ""
    lora_cache_mb: float = 64.0
    w_face: float = DEFAULT_W_FACE


@dataclass(frozen=True)
class GeneratorParams(ModelParams):
    """portrait_generator, portrait and portrait_stream: the generation path."""

    users_dir: str = ""
    max_images: int = MAX_IMAGES
    default_steps: int = DEFAULT_STEPS
    default_guidance: float = DEFAULT_GUIDANCE
    identity_mode: str = "runtime_lora"  # IDENTITY_MODES
    max_side_factor: float = MAX_SIDE_FACTOR
    max_work: float = MAX_WORK
    max_merged_models: int = 4  # merged mode: unet_user_* models loaded at once on the server (one LRU)


# --- models ----------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamParams(GeneratorParams):
    """portrait_stream: the generation path + a bound on streams in flight."""

    max_streams: int = 4  # more get UNAVAILABLE at once (each stream is a generation running)


@dataclass(frozen=True)
class ModelContract:
    """What a client sees of one served model."""

    name: str
    doc: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    max_batch_size: int = 0
    decoupled: bool = False
    params: type[ModelParams] = NoParams

    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)


GENERATION_INPUTS: tuple[Tensor, ...] = (
    Tensor("prompt", "STRING", (1,), optional=True),
    Tensor("negative_prompt", "STRING", (1,), optional=True),
    Tensor("style", "STRING", (1,), optional=True),
    Tensor("user_id", "STRING", (1,), optional=True),
    Tensor("num_images", "INT32", (1,), optional=True),
    Tensor("seed", "INT64", (1,), optional=True),
    Tensor("steps", "INT32", (1,), optional=True),
    Tensor("guidance", "FP32", (1,), optional=True),
    Tensor("height", "INT32", (1,), optional=True),
    Tensor("width", "INT32", (1,), optional=True),
    Tensor("scheduler", "STRING", (1,), optional=True),
    Tensor("template", "UINT8", (-1, -1, 3), optional=True),
    Tensor("strength", "FP32", (1,), optional=True),
    Tensor("cache_interval", "INT32", (1,), optional=True),  # 1..MAX_CACHE_INTERVAL, 1 = off
    Tensor("vae", "STRING", (1,), optional=True),  # VAE_CHOICES, default DEFAULT_VAE
    # template mode: the template's own pixels back outside the feathered face region after decoding (FaceChain's
    # crop-and-paste; default false: diffusers' inpainting returns the decoded latents as they are)
    Tensor("paste_template", "BOOL", (1,), optional=True),
    Tensor("control", "STRING", (1,), optional=True),  # CONTROL_CHOICES (template mode), default DEFAULT_CONTROL
    Tensor("control_scale", "FP32", (1,), optional=True),  # [0, MAX_CONTROL_SCALE], default DEFAULT_CONTROL_SCALE
)
PORTRAIT_EXTRA_INPUTS: tuple[Tensor, ...] = (
    Tensor("top_k", "INT32", (1,), optional=True),
    Tensor("fuse", "BOOL", (1,), optional=True),  # false == fusion_strength 0
    Tensor("fusion_strength", "FP32", (1,), optional=True),  # [0, 1], default DEFAULT_FUSION_STRENGTH
)
SELECT_OUTPUT_TENSORS: tuple[Tensor, ...] = (
    Tensor("images", "UINT8", (-1, -1, -1, 3)),
    Tensor("similarity", "FP32", (-1,)),
    Tensor("rank", "INT32", (-1,)),
    Tensor("selected", "INT32", (-1,)),
)
# portrait: ``similarity`` is the one that ranked (report["ranked_by"]); both kinds per candidate
PORTRAIT_OUTPUT_TENSORS = SELECT_OUTPUT_TENSORS + (
    Tensor("similarity_generated", "FP32", (-1,)),  # the generated (pre-fusion) face vs the user's reference
    Tensor("similarity_final", "FP32", (-1,)),  # the returned picture (after fusion) vs the user's reference
    Tensor("report", "STRING", (1,)),
)
UNET_CORE_INPUTS: tuple[Tensor, ...] = (
    Tensor("sample", "FP32", (LATENT_CHANNELS, -1, -1)),
    Tensor("timestep", "FP32", (1,)),
    Tensor("encoder_hidden_states", "FP32", (TOKENS, -1)),
)
UNET_OUTPUTS: tuple[Tensor, ...] = (Tensor("noise_pred", "FP32", (LATENT_CHANNELS, -1, -1)),)
#: the runtime-LoRA unet's step cache: a request asking for the output gets a full step and the feature
#: entering the UNet's last up block; a request sending it runs only the shallow part on it
UNET_CACHE_INPUTS: tuple[Tensor, ...] = (Tensor(DEEP_FEATURE, "FP32", (-1, -1, -1), optional=True),)
UNET_CACHE_OUTPUTS: tuple[Tensor, ...] = (Tensor(DEEP_FEATURE, "FP32", (-1, -1, -1)),)
#: the ControlNet's residuals [C, h/f, w/f] (f: 1, 2, 4, 8 along the down blocks): controlnet's outputs, the
#: runtime-LoRA unet's optional inputs (a request that sends them runs its control graph)
CONTROL_RESIDUALS: tuple[Tensor, ...] = tuple(Tensor(name, "FP32", (-1, -1, -1), optional=True)
                                              for name in CONTROL_DOWN_RESIDUALS + (CONTROL_MID_RESIDUAL,))

TOKENIZER = ModelContract(
    name="tokenizer",
    doc="CLIP BPE tokenizer (SD-1.5 convention: BOS, <=75 tokens, EOS, EOS padding).\n"
    "One request carries N prompts; cheap, so no dynamic batching.",
    inputs=(Tensor("prompt", "STRING", (-1,)),),
    outputs=(Tensor("input_ids", "INT32", (-1, TOKENS)),),
)
FACE_DETECTOR = ModelContract(
    name="face_detector",
    doc="MTCNN face detector. Per image: boxes [K,4] (x1,y1,x2,y2 px), scores [K],\n"
    "landmarks [K,5,2] (left eye, right eye, nose, mouth left, mouth right), padded\n"
    "to the request's largest K; num_faces says how many rows are real.\n"
    "cpu: P/R/O-net in ONNX Runtime in-process; gpu: nets are mtcnn_* models (BLS).",
    inputs=(Tensor("images", "UINT8", (-1, -1, 3)),),
    outputs=(
        Tensor("boxes", "FP32", (-1, 4)),
        Tensor("scores", "FP32", (-1,)),
        Tensor("landmarks", "FP32", (-1, 5, 2)),
        Tensor("num_faces", "INT32", (1,)),
    ),
    max_batch_size=FACE_NET_MAX_BATCH,
    params=FaceDetectorParams,
)
FACE_EMBEDDER = ModelContract(
    name="face_embedder",
    doc=f"dlib ResNet (ported): aligned {CHIP_SIZE}x{CHIP_SIZE} chips -> {EMBEDDING_DIM}-D. embeddings: L2-normalised\n"
    "(cosine similarity); descriptors: dlib's raw vectors (distance < 0.6 = same person).",
    inputs=(Tensor("faces", "UINT8", (CHIP_SIZE, CHIP_SIZE, 3)),),
    outputs=(Tensor("embeddings", "FP32", (EMBEDDING_DIM,)), Tensor("descriptors", "FP32", (EMBEDDING_DIM,))),
    max_batch_size=FACE_NET_MAX_BATCH,
    params=FaceEmbedderParams,
)
FACE_SELECT = ModelContract(
    name="face_select",
    doc="Rank candidate portraits by identity (BLS over face_detector + face_embedder).\n"
    f"One candidate set per request. Reference: reference_embedding FP32[1,{EMBEDDING_DIM}] or\n"
    "user_id (user registry). Outputs: images = top_k survivors best first;\n"
    "similarity/rank per input candidate (rank 0 = best; -1 and NaN = filtered: not\n"
    "exactly one face within size bounds); selected = input indices of the images.",
    inputs=(
        Tensor("images", "UINT8", (-1, -1, -1, 3)),
        Tensor("reference_embedding", "FP32", (1, EMBEDDING_DIM), optional=True),
        Tensor("user_id", "STRING", (1,), optional=True),
        Tensor("top_k", "INT32", (1,), optional=True),
    ),
    outputs=SELECT_OUTPUT_TENSORS,
    params=FaceSelectParams,
)


def _mtcnn(name: str, inputs: tuple[Tensor, ...], outputs: tuple[Tensor, ...]) -> ModelContract:
    return ModelContract(
        name=f"mtcnn_{name}",
        doc=f"MTCNN {name.upper()} (GPU target: called by face_detector's cascade over BLS).",
        inputs=inputs,
        outputs=outputs,
    )


MTCNN_PNET = _mtcnn("pnet", (Tensor("images", "FP32", (-1, 3, -1, -1)),),
                    (Tensor("offsets", "FP32", (-1, 4, -1, -1)), Tensor("probs", "FP32", (-1, 2, -1, -1))))
MTCNN_RNET = _mtcnn("rnet", (Tensor("images", "FP32", (-1, 3, 24, 24)),),
                    (Tensor("offsets", "FP32", (-1, 4)), Tensor("probs", "FP32", (-1, 2))))
MTCNN_ONET = _mtcnn("onet", (Tensor("images", "FP32", (-1, 3, 48, 48)),),
                    (Tensor("offsets", "FP32", (-1, 4)), Tensor("landmarks", "FP32", (-1, 10)),
                     Tensor("probs", "FP32", (-1, 2))))

TEXT_ENCODER = ModelContract(
    name="text_encoder",
    doc=f"Runtime-LoRA CLIP text encoder: token ids -> last_hidden_state [{TOKENS}, C], each batch\n"
    "item with its user's text-encoder LoRA (user_id; empty or no such layers = base model)\n"
    "at user_version (the registry version the caller pinned; empty = the current one).",
    inputs=(Tensor("input_ids", "INT32", (TOKENS,)), Tensor("user_id", "STRING", (1,), optional=True),
            Tensor("user_version", "STRING", (1,), optional=True)),
    outputs=(Tensor("last_hidden_state", "FP32", (TOKENS, -1)),),
    max_batch_size=16,
    params=TextEncoderParams,
)
UNET = ModelContract(
    name="unet",
    doc="Runtime-LoRA UNet: noise prediction for each batch item with that item's user's\n"
    "LoRA (user_id; empty = base model) at user_version (the registry version the caller\n"
    "pinned for its whole request; empty = the current one) and style LoRA (style), from\n"
    "an LRU bank.\n"
    "Step cache: request the deep_feature output (a full step), or send deep_feature\n"
    "(a shallow step: only the outer blocks run, on that cached feature).\n"
    "ControlNet: send the controlnet model's residuals (down_block_residual_*, mid_block_residual)\n"
    "and its control graph adds them (diffusers' down/mid_block_additional_residual(s)).",
    inputs=UNET_CORE_INPUTS + (Tensor("user_id", "STRING", (1,), optional=True),
                               Tensor("user_version", "STRING", (1,), optional=True),
                               Tensor("style", "STRING", (1,), optional=True))
    + UNET_CACHE_INPUTS + CONTROL_RESIDUALS,
    outputs=UNET_OUTPUTS + UNET_CACHE_OUTPUTS,
    max_batch_size=32,
    params=UnetParams,
)
#: the few-step UNet, served only by a repository assembled with ``export repository --distill-lora FILE``: a
#: distillation LoRA (LCM-LoRA, TCD-LoRA, Hyper-SD; server-wide, the same for every user) merged into the base
#: UNet, with the runtime-LoRA unet's tensors, parameters and code (users' LoRAs ride on it at w_face). A request
#: whose scheduler is in FEW_STEP_SCHEDULERS denoises on it where the repository has it (pipeline.job.unet_model)
UNET_FEWSTEP = ModelContract(
    name="unet_fewstep",
    doc="Few-step UNet: the runtime-LoRA unet (same tensors and parameters) over the base UNet with\n"
    "the repository's distillation LoRA (LCM-LoRA, TCD-LoRA, Hyper-SD) merged in; each batch\n"
    "item's user LoRA (user_id, user_version) and style LoRA apply on top, from an LRU bank.\n"
    "Used by requests with a few-step scheduler (lcm, tcd); the others run on unet.",
    inputs=UNET.inputs,
    outputs=UNET.outputs,
    max_batch_size=UNET.max_batch_size,
    params=UnetParams,
)
#: the served runtime-LoRA UNets: the plain one and the optional few-step one (one graph contract, one code)
RUNTIME_LORA_UNETS = (UNET.name, UNET_FEWSTEP.name)
#: an inpainting UNet's input channels: the sample's latent channels, the mask (1), the masked template's latent
#: channels (SD-1.5 inpainting's layout: 4 + 1 + 4 = 9; diffusers' StableDiffusionInpaintPipeline's order)
INPAINT_UNET_CHANNELS = 2 * LATENT_CHANNELS + 1
#: model_info.json's record of the inpainting UNet (folder, hash, in_channels; null = the repository serves no
#: unet_inpaint)
INPAINT_INFO = "inpaint_unet"
#: template mode's inpainting UNet (a user's SD-1.5 inpainting weights), served only by a repository assembled with
#: ``export repository --inpaint-unet DIR``: the runtime-LoRA unet's graph (the same LoRA inputs and manifest, so
#: users' and styles' LoRAs apply) over a UNet taking the masked template's latent and the mask as extra input
#: channels; no step cache, no ControlNet graph. Every template-mode request of that repository denoises on it
#: (pipeline.job.unet_model); text-to-image requests keep the unet. Batches and budgets like the unet.
UNET_INPAINT = ModelContract(
    name="unet_inpaint",
    doc="Inpainting UNet (template mode; export repository --inpaint-unet): sample [9, h, w] =\n"
    "the scaled latents, the mask, the masked template's latent (StableDiffusionInpaintPipeline's\n"
    "order) -> noise_pred [4, h, w]; each batch item's user LoRA (user_id, user_version) and\n"
    "style LoRA from an LRU bank, as the unet. No step cache, no ControlNet residuals.",
    inputs=(Tensor("sample", "FP32", (INPAINT_UNET_CHANNELS, -1, -1)),) + UNET_CORE_INPUTS[1:]
    + (Tensor("user_id", "STRING", (1,), optional=True), Tensor("user_version", "STRING", (1,), optional=True),
       Tensor("style", "STRING", (1,), optional=True)),
    outputs=UNET_OUTPUTS,
    max_batch_size=UNET.max_batch_size,
    params=UnetParams,
)
#: every served UNet whose batch items name their user and style (a LoRA bank over the runtime-LoRA graph)
LORA_BANK_UNETS = RUNTIME_LORA_UNETS + (UNET_INPAINT.name,)
#: template mode's ControlNet (diffusers' ControlNetModel, user-supplied weights), served only by a repository
#: assembled with ``export repository --controlnet DIR``; batches and budgets like the unet (UNET_MAX_BATCH_CELLS)
CONTROLNET = ModelContract(
    name="controlnet",
    doc="ControlNet (template mode with control): the UNet's inputs + the conditioning image\n"
    "controlnet_cond [3, 8h, 8w] in [0, 1] and conditioning_scale -> the residuals the unet\n"
    "adds (down_block_residual_0.. as many as the UNet has, mid_block_residual), x the scale.",
    inputs=UNET_CORE_INPUTS + (Tensor("controlnet_cond", "FP32", (3, -1, -1)),
                               Tensor("conditioning_scale", "FP32", (1,))),
    outputs=tuple(Tensor(t.name, t.dtype, t.dims) for t in CONTROL_RESIDUALS),
    max_batch_size=32,
    params=NetParams,
)
VAE_DECODER = ModelContract(
    name="vae_decoder",
    doc="VAE decoder: scaled latent [4, h, w] -> RGB image UINT8 [8h, 8w, 3].",
    inputs=(Tensor("latent", "FP32", (LATENT_CHANNELS, -1, -1)),),
    outputs=(Tensor("images", "UINT8", (-1, -1, 3)),),
    max_batch_size=8,
    params=NetParams,
)
VAE_ENCODER = ModelContract(
    name="vae_encoder",
    doc="VAE encoder (template mode): RGB image UINT8 [H, W, 3] -> scaled latent mean.",
    inputs=(Tensor("images", "UINT8", (-1, -1, 3)),),
    outputs=(Tensor("latent", "FP32", (LATENT_CHANNELS, -1, -1)),),
    max_batch_size=8,
    params=NetParams,
)
#: the tiny autoencoder (AutoencoderTiny / TAESD, user-supplied weights): the full VAEs' tensors and budgets
VAE_DECODER_TINY = ModelContract(
    name="vae_decoder_tiny",
    doc="Tiny VAE decoder (AutoencoderTiny, TAESD; a request's vae=tiny): scaled latent [4, h, w] ->\n"
    "RGB image UINT8 [8h, 8w, 3], the tensors of vae_decoder.",
    inputs=VAE_DECODER.inputs,
    outputs=VAE_DECODER.outputs,
    max_batch_size=VAE_DECODER.max_batch_size,
    params=NetParams,
)
VAE_ENCODER_TINY = ModelContract(
    name="vae_encoder_tiny",
    doc="Tiny VAE encoder (AutoencoderTiny, TAESD; template mode with vae=tiny): RGB image UINT8\n"
    "[H, W, 3] -> scaled latent (deterministic), the tensors of vae_encoder.",
    inputs=VAE_ENCODER.inputs,
    outputs=VAE_ENCODER.outputs,
    max_batch_size=VAE_ENCODER.max_batch_size,
    params=NetParams,
)
#: a request's ``vae`` -> (decoder, encoder) models
VAE_MODELS: dict[str, tuple[ModelContract, ModelContract]] = {
    "full": (VAE_DECODER, VAE_ENCODER), "tiny": (VAE_DECODER_TINY, VAE_ENCODER_TINY)}
PORTRAIT_GENERATOR = ModelContract(
    name="portrait_generator",
    doc="Portraits for a user (BLS): tokenizer -> text_encoder -> denoising loop over unet\n"
    "(DPM-Solver multistep default; euler, ddim) -> vae_decoder (vae=tiny: vae_decoder_tiny).\n"
    "Template mode with template (+ strength): the template's face region is re-generated.\n"
    "Deterministic for a fixed seed (image i uses seed + i).",
    inputs=GENERATION_INPUTS,
    outputs=(Tensor("images", "UINT8", (-1, -1, -1, 3)),),
    params=GeneratorParams,
)
PORTRAIT = ModelContract(
    name="portrait",
    doc="The one call a client makes: generate (in-process, nets over BLS) -> rank the\n"
    "generated faces (face_detector + face_embedder) -> blend the user's best photo into\n"
    "each face (fusion_strength in [0,1], 0 = off; fuse=false == 0) -> score the results.\n"
    "images = top_k best first; per candidate similarity_generated (pre-fusion),\n"
    "similarity_final (returned picture), similarity = the one that ranked, rank (-1, NaN =\n"
    "filtered); report = JSON (ranked_by, seed, stage timings, provenance).",
    inputs=GENERATION_INPUTS + PORTRAIT_EXTRA_INPUTS,
    outputs=PORTRAIT_OUTPUT_TENSORS,
    params=GeneratorParams,
)
PORTRAIT_STREAM = ModelContract(
    name="portrait_stream",
    doc="portrait with progress (decoupled, over a gRPC stream): one response per denoising\n"
    "step with progress = [done, total], then the final response with portrait's outputs.",
    inputs=GENERATION_INPUTS + PORTRAIT_EXTRA_INPUTS,
    outputs=(Tensor("progress", "INT32", (2,)),) + PORTRAIT_OUTPUT_TENSORS,
    decoupled=True,
    params=StreamParams,
)


def merged_unet(user_id: str) -> ModelContract:
    """Serving mode 1: one user's merged UNet, a model of its own."""
    return ModelContract(
        name=merged_unet_name(user_id),
        doc=f"Merged UNet of user {user_id!r} (face + style LoRA fused; serving mode 1).",
        inputs=UNET_CORE_INPUTS,
        outputs=UNET_OUTPUTS,
        max_batch_size=32,
        params=NetParams,
    )


CONTRACTS: tuple[ModelContract, ...] = (
    TOKENIZER, FACE_DETECTOR, MTCNN_PNET, MTCNN_RNET, MTCNN_ONET, FACE_EMBEDDER, FACE_SELECT,
    TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER, PORTRAIT_GENERATOR, PORTRAIT, PORTRAIT_STREAM,
)
#: served only where the repository was assembled with them (``export repository --tiny-vae DIR``,
#: ``--distill-lora FILE``, ``--controlnet DIR``, ``--inpaint-unet DIR``)
OPTIONAL_CONTRACTS: tuple[ModelContract, ...] = (VAE_DECODER_TINY, VAE_ENCODER_TINY, UNET_FEWSTEP, CONTROLNET,
                                                 UNET_INPAINT)
BY_NAME: dict[str, ModelContract] = {c.name: c for c in CONTRACTS + OPTIONAL_CONTRACTS}

# Names the client and the BLS callers use (one spelling, from the tables above).
DETECTOR_OUTPUTS = FACE_DETECTOR.output_names()
EMBEDDER_OUTPUTS = FACE_EMBEDDER.output_names()
SELECT_OUTPUTS = FACE_SELECT.output_names()
PORTRAIT_OUTPUTS = PORTRAIT.output_names()
PORTRAIT_INPUT_NAMES = PORTRAIT.input_names()


#: Triton tensor type -> numpy dtype name (the numeric types of the tables above)
NUMPY_DTYPES: dict[str, str] = {"INT32": "int32", "INT64": "int64", "FP32": "float32", "BOOL": "bool",
                                "UINT8": "uint8"}

#: one-value numeric generation inputs and their numpy dtype names
SCALAR_INPUTS: dict[str, str] = {
    t.name: NUMPY_DTYPES[t.dtype] for t in GENERATION_INPUTS + PORTRAIT_EXTRA_INPUTS
    if t.dtype not in ("STRING", "UINT8") and t.dims == (1,)
}
