"""portrait_generator's request handling: defaults, validation, prompt
resolution, and the nets as BLS calls (used by model_repository/
portrait_generator and, with in-process nets, by tests and benchmarks)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from facetron.diffusion.sampler import GenerationRequest
from facetron.diffusion.styles import DEFAULT_STYLE, get_style, style_prompt
from facetron.errors import InvalidInputError, NotFoundError
from facetron.serving.portrait import DiffusionNets
from facetron.users import UserRegistry, validate_user_id

MODEL_INFO = "model_info.json"
SCHEDULER_CONFIG = "scheduler_config.json"
MIN_TEMPLATE_SIDE = 32


@dataclass
class PortraitJob:
    """A validated portrait request."""

    prompt: str
    negative_prompt: str
    user_id: str  # "" = base model
    style: str
    request: GenerationRequest
    template: Optional[np.ndarray] = None


def _bls_chunked(model: str, name: str, x: np.ndarray, out: str, max_batch: int, extra=None) -> np.ndarray:
    from facetron.serving.triton_utils import bls_infer

    parts = []
    for s in range(0, len(x), max_batch):
        inputs = {name: np.ascontiguousarray(x[s : s + max_batch])}
        for k, v in (extra or {}).items():
            inputs[k] = np.ascontiguousarray(v[s : s + max_batch])
        parts.append(bls_infer(model, inputs, [out])[out])
    return np.concatenate(parts)


def ensure_merged_unet(user_id: str, repository: Path) -> str:
    """Serving mode 1: the user's merged UNet model, loaded on first use
    (the server runs with explicit model control). A model that is not in
    the repository is refused before asking the server: python backend 2.51
    aborts the whole server when a BLS load_model of a missing model fails."""
    from facetron.export.model_configs import MERGED_UNET_PREFIX
    from facetron.serving.triton_utils import pb

    name = f"{MERGED_UNET_PREFIX}{user_id}"
    if not (Path(repository) / name / "config.pbtxt").is_file():
        raise NotFoundError(
            f"user_id: no merged UNet for user {user_id!r} in this repository "
            f"(`facetron export add-user --user {user_id}`)"
        )
    pb_utils = pb()
    if not pb_utils.is_model_ready(model_name=name):
        try:
            pb_utils.load_model(model_name=name)
        except Exception as exc:  # noqa: BLE001 - the server's reason, named
            raise NotFoundError(
                f"user_id: no merged UNet for user {user_id!r} in this repository "
                f"(`facetron export add-user --user {user_id}`): {exc}"
            ) from None
    return name


def bls_nets(info: dict, user_id: str, style: str, identity_mode: str = "runtime_lora",
             repository: Path | None = None) -> DiffusionNets:
    """The diffusion nets as BLS calls to the models of the same server.

    ``identity_mode``: ``runtime_lora`` (one ``unet``, the user's LoRA from its
    bank) or ``merged`` (the user's own ``unet_user_<id>`` model)."""
    from facetron.serving.triton_utils import bls_infer

    merged = ensure_merged_unet(user_id, repository) if identity_mode == "merged" and user_id else None

    def unet(sample: np.ndarray, t: np.ndarray, hidden: np.ndarray) -> np.ndarray:
        n = len(sample)
        extra = {"timestep": t.reshape(n, 1).astype(np.float32), "encoder_hidden_states": hidden}
        if merged is not None:
            return _bls_chunked(merged, "sample", sample, "noise_pred", 32, extra)
        extra["user_id"] = np.array([[user_id.encode()]] * n, dtype=object)
        extra["style"] = np.array([[style.encode()]] * n, dtype=object)
        return _bls_chunked("unet", "sample", sample, "noise_pred", 32, extra)

    return DiffusionNets(
        tokenize=lambda texts: bls_infer(
            "tokenizer", {"prompt": np.array([t.encode() for t in texts], dtype=object)}, ["input_ids"]
        )["input_ids"],
        text_encode=lambda ids: _bls_chunked("text_encoder", "input_ids", ids, "last_hidden_state", 16),
        unet=unet,
        vae_decode=lambda latent: _bls_chunked("vae_decoder", "latent", latent, "images", 8),
        vae_encode=lambda images: _bls_chunked("vae_encoder", "images", images, "latent", 8),
        latent_channels=int(info["latent_channels"]),
        latent_factor=int(info["latent_factor"]),
    )


def read_model_info(folder: Path) -> tuple[dict, dict]:
    """(model_info, scheduler_config) written beside the generator by the assembler."""
    return json.loads((folder / MODEL_INFO).read_text()), json.loads((folder / SCHEDULER_CONFIG).read_text())


def user_text(registry: UserRegistry, user_id: str) -> tuple[str, str]:
    """(trigger token, subject words) of a registered user."""
    if not user_id:
        return "a person", "a person"
    udir = registry.user_dir(user_id)
    if not registry.exists(user_id):
        raise NotFoundError(f"user_id: unknown user {user_id!r} (not registered in {registry.root})")
    trigger, subject = "<facetron-user>", "a person"
    for name in ("lora.json", "user.json"):
        path = udir / name
        if path.is_file():
            meta = json.loads(path.read_text())
            trigger = meta.get("trigger_token", trigger)
            subject = meta.get("subject", subject)
    return trigger, subject


def build_job(values: dict, info: dict, registry: UserRegistry, max_images: int = 16,
              default_steps: int = 25, default_guidance: float = 7.0) -> PortraitJob:
    """Resolve defaults and validate everything a client sent (names the input on error)."""
    user_id = values.get("user_id") or ""
    if user_id:
        validate_user_id(user_id)
    style_name = values.get("style") or DEFAULT_STYLE
    style = get_style(style_name)
    trigger, subject = user_text(registry, user_id)
    prompt = values.get("prompt")
    if prompt is None:
        prompt = style_prompt(style, trigger, subject)
    elif not prompt.strip():
        raise InvalidInputError("prompt", "is empty (omit it to use the style's prompt)")
    else:
        prompt = prompt.replace("{trigger}", trigger)
    negative = values.get("negative_prompt")
    negative = style.negative if negative is None else negative
    res = int(info["resolution"])
    template = values.get("template")
    if template is not None:
        if template.dtype != np.uint8 or template.ndim != 3 or template.shape[2] != 3:
            raise InvalidInputError("template", f"expected UINT8 [H, W, 3], got {template.dtype} {list(template.shape)}")
        if min(template.shape[:2]) < MIN_TEMPLATE_SIDE:
            raise InvalidInputError("template", f"is {template.shape[1]}x{template.shape[0]}; at least {MIN_TEMPLATE_SIDE} px a side")
    req = GenerationRequest(
        num_images=int(values.get("num_images") or 1),
        steps=int(values["steps"]) if values.get("steps") is not None else default_steps,
        guidance=float(values["guidance"]) if values.get("guidance") is not None else default_guidance,
        seed=int(values.get("seed") or 0),
        height=int(values.get("height") or res),
        width=int(values.get("width") or res),
        scheduler=values.get("scheduler") or "dpmsolver",
        strength=float(values["strength"]) if values.get("strength") is not None else 0.6,
    )
    if values.get("num_images") is not None and int(values["num_images"]) < 1:
        raise InvalidInputError("num_images", f"must be 1..{max_images}, got {values['num_images']}")
    req.validate(int(info["latent_factor"]), max_images)
    return PortraitJob(prompt, negative, user_id, style_name, req, template)


PORTRAIT_INPUT_NAMES = ("prompt", "negative_prompt", "style", "user_id", "num_images", "seed", "steps", "guidance",
                       "height", "width", "scheduler", "template", "strength")
_STRINGS = ("prompt", "negative_prompt", "style", "user_id", "scheduler")
_SCALARS = (("num_images", np.int32), ("steps", np.int32), ("height", np.int32), ("width", np.int32),
            ("seed", np.int64), ("guidance", np.float32), ("strength", np.float32))


def portrait_values(arrays: dict[str, np.ndarray]) -> dict:
    """The portrait inputs (tensors by name, any subset) as plain Python values."""
    from facetron.serving.triton_utils import one_scalar, one_string

    values: dict = {name: one_string(arrays[name], name) for name in _STRINGS if arrays.get(name) is not None}
    values.update({name: one_scalar(arrays[name], name, dtype) for name, dtype in _SCALARS
                   if arrays.get(name) is not None})
    values["template"] = arrays.get("template")
    return values


def request_arrays(request, names) -> dict[str, np.ndarray]:
    """The named inputs present in a Triton request, as numpy."""
    from facetron.serving.triton_utils import pb

    out = {}
    for name in names:
        t = pb().get_input_tensor_by_name(request, name)
        if t is not None:
            out[name] = t.as_numpy()
    return out


def read_portrait_inputs(request) -> dict:
    """The optional portrait inputs of a Triton request as plain Python values."""
    return portrait_values(request_arrays(request, PORTRAIT_INPUT_NAMES))


def main_face(dets: dict[str, np.ndarray], index: int, shape: tuple[int, int]) -> int | None:
    """The subject's face in image ``index``: among faces at least a quarter the
    area of the largest, the one nearest the image centre (templates often
    show neighbours' partial faces at the edges)."""
    k = int(dets["num_faces"].reshape(-1)[index])
    if k == 0:
        return None
    boxes = dets["boxes"][index, :k]
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    big = np.flatnonzero(areas >= 0.25 * areas.max())
    centres = (boxes[big, :2] + boxes[big, 2:]) / 2
    dist = np.linalg.norm(centres - np.array([shape[1] / 2, shape[0] / 2]), axis=1)
    return int(big[np.argmin(dist)])


def template_landmarks(fitted: np.ndarray, detect) -> np.ndarray:
    """5 landmarks of the subject's face in a (fitted) template; template mode needs one."""
    dets = detect(fitted[None])
    j = main_face(dets, 0, fitted.shape[:2])
    if j is None:
        raise InvalidInputError("template", "no face found: template mode needs a photo with a face")
    return dets["landmarks"][0, j]


def run_job(job: PortraitJob, nets: DiffusionNets, scheduler_config: dict, detect, progress=None) -> np.ndarray:
    """Generate the job's images (template mode when it has a template)."""
    from facetron.serving.portrait import fit_template, generate

    fitted, face = None, None
    if job.template is not None:
        fitted = fit_template(job.template, job.request.height, job.request.width)
        face = template_landmarks(fitted, detect)
    return generate(nets, scheduler_config, job.prompt, job.negative_prompt, job.request,
                    template=fitted, template_face=face, progress=progress)
