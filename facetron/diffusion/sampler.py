"""The denoising loop: text embeddings -> latents -> images.

Runtime-agnostic: the nets are plain callables on numpy arrays with the
ONNX/Triton contracts of ARCHITECTURE.md (so the same loop runs with ONNX
Runtime in-process, with torch modules, or inside Triton's
``portrait_generator`` over BLS). Schedulers are diffusers' own; classifier-
free guidance runs unconditional + conditional in one UNet batch.

Determinism: image ``i`` of a request starts from noise drawn with seed
``seed + i`` (torch's CPU generator, like diffusers), so a fixed seed gives
the same images whatever the batch size or runtime. The schedulers that draw
fresh noise between steps (``lcm``, ``tcd``) draw image ``i``'s from that same
generator, after its initial noise, as diffusers' pipelines do with a list of
generators (:func:`step_kwargs`).

Equal to diffusers (``tests/test_diffusers_parity.py``): text-to-image is
``StableDiffusionPipeline`` with ``latents`` = :func:`initial_noise`
(or, equivalently, ``generator=[torch.Generator().manual_seed(seed + i)
for i in range(n)]``, which ``lcm`` and ``tcd`` need: they draw from the
generators at every step but the last; ``tcd`` with ``eta=contract.TCD_ETA``);
template mode (``init_latents`` + ``mask``) is ``StableDiffusionInpaintPipeline``
with the same noise, the start step of its ``get_timesteps``
(:func:`start_step`), as ``image`` the template's latent and as ``mask_image``
the template's face mask (``padding_mask_crop=None``: no paste); ``init_latents``
alone is ``StableDiffusionImg2ImgPipeline``. One deliberate difference:
facetron's ``vae_encoder`` returns the **mean** of the VAE's latent
distribution (deterministic, one served net), where diffusers *samples* it
with the request's generator(s); the parity tests pass that mean to diffusers
as a 4-channel ``image`` (and ``masked_image_latents``), which its
``prepare_latents`` / ``prepare_mask_latents`` take as latents as they are.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, LCMScheduler, TCDScheduler

from facetron import contract
from facetron.contract import SCHEDULERS
from facetron.errors import InvalidInputError

UNetFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]  # sample, timestep [B] f32, hidden -> noise
DecodeFn = Callable[[np.ndarray], np.ndarray]  # latent (scaled) -> uint8 [N,H,W,3]
EncodeFn = Callable[[np.ndarray], np.ndarray]  # uint8 [N,H,W,3] -> latent (scaled)
ProgressFn = Callable[[int, int], None]  # (step done, total)



SCHEDULER_CLASSES = {"dpmsolver": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler, "ddim": DDIMScheduler,
                     "lcm": LCMScheduler, "tcd": TCDScheduler}
#: What facetron sets over the base model's scheduler config, per scheduler.
#: ``dpmsolver`` (the default) is DPM-Solver++ 2M with Karras sigmas: the
#: multistep solver FaceChain samples with, on the Karras noise schedule that
#: keeps its quality at 20-25 steps (contract.DEFAULT_STEPS) instead of 40.
SCHEDULER_SETTINGS: dict[str, dict] = {
    "dpmsolver": {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    "euler": {},
    "ddim": {},
    "lcm": {},
    "tcd": {},
}
#: What facetron passes to ``scheduler.step`` besides the generators, per
#: scheduler: TCD's ``eta`` (contract.TCD_ETA). The others run at diffusers'
#: pipeline default, ``eta=0.0``, which is DDIM's own default: nothing to pass.
STEP_SETTINGS: dict[str, dict] = {"dpmsolver": {}, "euler": {}, "ddim": {}, "lcm": {}, "tcd": {"eta": contract.TCD_ETA}}


def make_scheduler(name: str, config: dict):
    """A diffusers scheduler: the base model's scheduler config with
    :data:`SCHEDULER_SETTINGS` of ``name`` over it (diffusers pipelines given
    ``SCHEDULER_CLASSES[name].from_config(config, **SCHEDULER_SETTINGS[name])``
    sample the same, tests/test_diffusers_parity.py). Config keys the class
    does not take (a DDPM config's ``variance_type`` for lcm / tcd) are left
    out: diffusers ignores them too, with a warning at every request."""
    if name not in SCHEDULER_CLASSES:
        raise InvalidInputError("scheduler", f"expected one of {', '.join(SCHEDULERS)}, got {name!r}")
    cls = SCHEDULER_CLASSES[name]
    taken = inspect.signature(cls.__init__).parameters
    config = {k: v for k, v in config.items() if k in taken or k.startswith("_")}
    return cls.from_config(config, **SCHEDULER_SETTINGS[name])


@dataclass(frozen=True)
class GenerationRequest:
    num_images: int = contract.DEFAULT_NUM_IMAGES
    steps: int = contract.DEFAULT_STEPS
    guidance: float = contract.DEFAULT_GUIDANCE
    seed: int = 0
    height: int = 512
    width: int = 512
    scheduler: str = contract.DEFAULT_SCHEDULER
    strength: float = contract.DEFAULT_STRENGTH  # template mode: how much of the template is re-generated (0..1]
    cache_interval: int = contract.DEFAULT_CACHE_INTERVAL  # step caching: a full UNet every N steps (1 = off)
    # template mode's ControlNet (facetron.pipeline.control): the conditioning and its scale; the loop itself never
    # reads them (generation wraps the UNet callable in the controlnet + unet pair)
    control: str = contract.DEFAULT_CONTROL
    control_scale: float = contract.DEFAULT_CONTROL_SCALE

    def validate(self, latent_factor: int = contract.LATENT_FACTOR, max_images: int = contract.MAX_IMAGES) -> None:
        """The contract's generation rules (facetron.contract.check_generation, check_control).
        Callers validate once; the loop below trusts a validated request."""
        contract.check_generation(num_images=self.num_images, steps=self.steps, guidance=self.guidance,
                                  height=self.height, width=self.width, strength=self.strength,
                                  scheduler=self.scheduler, latent_factor=latent_factor, max_images=max_images,
                                  cache_interval=self.cache_interval)
        contract.check_control(self.control, self.control_scale)


def noise_generators(seed: int, count: int) -> list[torch.Generator]:
    """Image i's own torch CPU generator, seeded ``seed + i``."""
    return [torch.Generator().manual_seed(int(seed) + i) for i in range(count)]


def draw_noise(generators: list[torch.Generator], shape: tuple[int, int, int]) -> torch.Tensor:
    """[len(generators), C, h, w] noise, item i drawn from ``generators[i]`` (which advance)."""
    return torch.cat([torch.randn((1,) + shape, generator=g) for g in generators])


def initial_noise(seed: int, count: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """[count, C, h, w] noise; image i from its own generator seeded ``seed + i``."""
    return draw_noise(noise_generators(seed, count), shape)


def step_kwargs(name: str, scheduler, generators: list[torch.Generator]) -> dict:
    """The keyword arguments of ``scheduler.step`` besides the sample, as
    diffusers' ``prepare_extra_step_kwargs`` builds them: ``eta`` (from
    :data:`STEP_SETTINGS`) and the images' ``generators`` where ``step`` takes
    them. Only ``lcm`` and ``tcd`` (with eta > 0) draw from them; the other
    schedulers, with facetron's settings, never do."""
    params = inspect.signature(scheduler.step).parameters
    kwargs = {k: v for k, v in STEP_SETTINGS[name].items() if k in params}
    if "generator" in params:
        kwargs["generator"] = generators
    return kwargs


def wire_strength(strength: float) -> float:
    """``strength`` as the client meant it: a value that is exactly an FP32
    (what the ``strength`` input carries on the wire) is read as the shortest
    decimal that rounds to that FP32 (``0.7f`` = 0.699999988... -> 0.7);
    any other float is kept. diffusers, given the Python float the client
    typed, computes ``int(10 * 0.7) = 7``; the raw FP32 would give
    ``int(6.99999988) = 6``, one denoising step fewer."""
    strength = float(strength)
    as_fp32 = np.float32(strength)
    return float(repr(as_fp32)) if float(as_fp32) == strength else strength


def start_step(steps: int, strength: float) -> int:
    """Template mode's first step, diffusers' ``StableDiffusionImg2ImgPipeline.
    get_timesteps`` rule (``StableDiffusionInpaintPipeline``'s is a copy of it):
    ``init_timestep = min(int(steps * strength), steps)``,
    ``t_start = max(steps - init_timestep, 0)`` — truncation, no epsilon, as
    diffusers does (strength read by :func:`wire_strength`). The loop then
    runs ``steps - t_start = int(steps * strength)`` steps. Where that is 0
    (``steps * strength < 1``) diffusers has no timestep left and fails;
    facetron runs the last step instead."""
    init_timestep = min(int(steps * wire_strength(strength)), steps)
    t_start = max(steps - init_timestep, 0)
    return min(t_start, steps - 1)


def denoise(
    unet: UNetFn,
    scheduler_config: dict,
    cond: np.ndarray,
    uncond: np.ndarray,
    req: GenerationRequest,
    latent_channels: int,
    latent_factor: int,
    init_latents: Optional[np.ndarray] = None,
    progress: Optional[ProgressFn] = None,
    mask: Optional[np.ndarray] = None,
    masked_image_latents: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Run the scheduler loop; returns final latents (scaled) [N, C, h, w].

    ``cond``/``uncond`` are [1, 77, D] text embeddings (broadcast to N).
    With ``init_latents`` [1 or N, C, h, w] (the template's VAE latent *mean*
    x scaling factor, see the module docstring) alone, the loop starts from
    the template noised to the timestep of :func:`start_step` instead of pure
    noise, as diffusers' img2img does.

    With ``mask`` too (template mode: float32 {0, 1} [h, w], 1 = re-generated,
    :func:`facetron.pipeline.template.latent_mask`) it is diffusers'
    ``StableDiffusionInpaintPipeline``: at strength 1 the loop starts from pure
    noise (its ``is_strength_max``), else as above; then

    * a plain (``latent_channels``-input) UNet, ``masked_image_latents`` None:
      after each scheduler step the region outside the mask is the template's
      latent noised with the initial noise to the *next* timestep (after the
      last step: the latent itself), ``latents = (1 - mask) * known + mask * latents``;
    * an inpainting UNet (``2 * latent_channels + 1`` inputs, SD-1.5
      inpainting): ``masked_image_latents`` [1 or N, C, h, w] (the masked
      template's latent) and the mask follow the scaled sample as extra input
      channels, and nothing is blended."""
    n = req.num_images
    h, w = req.height // latent_factor, req.width // latent_factor
    scheduler = make_scheduler(req.scheduler, scheduler_config)
    scheduler.set_timesteps(req.steps)
    timesteps = scheduler.timesteps
    generators = noise_generators(req.seed, n)
    noise = draw_noise(generators, (latent_channels, h, w))
    extra = step_kwargs(req.scheduler, scheduler, generators)
    if init_latents is None and (mask is not None or masked_image_latents is not None):
        raise ValueError("denoise: mask and masked_image_latents need init_latents")
    if init_latents is None:
        latents = noise * scheduler.init_noise_sigma
    else:
        init = _latent_batch(init_latents, n, (latent_channels, h, w))
        start = start_step(req.steps, req.strength)
        timesteps = timesteps[start * scheduler.order :]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start * scheduler.order)
        if mask is not None and wire_strength(req.strength) == 1.0:
            latents = noise * scheduler.init_noise_sigma
        else:
            latents = scheduler.add_noise(init, noise, timesteps[:1].repeat(n))
    guided = req.guidance > 1.0
    blend, conditioning = _inpaint_inputs(mask, masked_image_latents, n, (latent_channels, h, w), guided)
    hidden = np.concatenate([np.repeat(uncond, n, 0), np.repeat(cond, n, 0)]) if guided else np.repeat(cond, n, 0)
    hidden = hidden.astype(np.float32)
    for i, t in enumerate(timesteps):
        model_in = torch.cat([latents, latents]) if guided else latents
        model_in = scheduler.scale_model_input(model_in, t)
        if conditioning is not None:
            model_in = torch.cat([model_in, conditioning], dim=1)
        tt = np.full((model_in.shape[0],), float(t), np.float32)
        pred = torch.from_numpy(np.asarray(unet(model_in.numpy().astype(np.float32), tt, hidden)))
        if guided:
            u, c = pred.chunk(2)
            pred = u + req.guidance * (c - u)
        latents = scheduler.step(pred, t, latents, **extra, return_dict=False)[0]
        if blend is not None:
            known = init
            if i < len(timesteps) - 1:
                known = scheduler.add_noise(init, noise, torch.tensor([timesteps[i + 1]]))
            latents = (1 - blend) * known + blend * latents
        if progress is not None:
            progress(i + 1, len(timesteps))
    return latents.numpy().astype(np.float32)


def _latent_batch(latents: np.ndarray, n: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """[1 or n, C, h, w] template latents as an [n, C, h, w] tensor; InvalidInputError on another shape."""
    t = torch.from_numpy(np.asarray(latents, np.float32))
    if t.ndim != 4 or t.shape[1:] != shape or t.shape[0] not in (1, n):
        raise InvalidInputError("template", f"latent shape {list(t.shape)} does not match {[n, *shape]}")
    return t.expand(n, -1, -1, -1) if t.shape[0] == 1 else t


def _inpaint_inputs(mask: Optional[np.ndarray], masked_image_latents: Optional[np.ndarray], n: int,
                    shape: tuple[int, int, int], guided: bool) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(blend mask [1, 1, h, w] for a plain UNet, extra UNet input [B, 1 + C, h, w] for an inpainting UNet):
    at most one of them, as :func:`denoise` uses them; (None, None) without a mask."""
    if mask is None:
        if masked_image_latents is not None:
            raise ValueError("denoise: masked_image_latents needs a mask")
        return None, None
    m = torch.from_numpy(np.asarray(mask, np.float32))
    if m.shape != shape[1:]:
        raise InvalidInputError("template", f"mask shape {list(m.shape)} does not match the latent's {list(shape[1:])}")
    m = m[None, None]
    if masked_image_latents is None:
        return m, None
    conditioning = torch.cat([m.expand(n, -1, -1, -1), _latent_batch(masked_image_latents, n, shape)], dim=1)
    return None, torch.cat([conditioning, conditioning]) if guided else conditioning
