"""The denoising loop: text embeddings -> latents -> images.

Runtime-agnostic: the nets are plain callables on numpy arrays with the
ONNX/Triton contracts of ARCHITECTURE.md (so the same loop runs with ONNX
Runtime in-process, with torch modules, or inside Triton's
``portrait_generator`` over BLS). Schedulers are diffusers' own; classifier-
free guidance runs unconditional + conditional in one UNet batch.

Determinism: image ``i`` of a request starts from noise drawn with seed
``seed + i`` (torch's CPU generator, like diffusers), so a fixed seed gives
the same images whatever the batch size or runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from facetron import contract
from facetron.contract import SCHEDULERS
from facetron.errors import InvalidInputError

UNetFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]  # sample, timestep [B] f32, hidden -> noise
DecodeFn = Callable[[np.ndarray], np.ndarray]  # latent (scaled) -> uint8 [N,H,W,3]
EncodeFn = Callable[[np.ndarray], np.ndarray]  # uint8 [N,H,W,3] -> latent (scaled)
ProgressFn = Callable[[int, int], None]  # (step done, total)



def make_scheduler(name: str, config: dict):
    """A diffusers scheduler from the base model's scheduler config."""
    classes = {"dpmsolver": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler, "ddim": DDIMScheduler}
    if name not in classes:
        raise InvalidInputError("scheduler", f"expected one of {', '.join(SCHEDULERS)}, got {name!r}")
    return classes[name].from_config(config)


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

    def validate(self, latent_factor: int = contract.LATENT_FACTOR, max_images: int = contract.MAX_IMAGES) -> None:
        """The contract's generation rules (facetron.contract.check_generation).
        Callers validate once; the loop below trusts a validated request."""
        contract.check_generation(num_images=self.num_images, steps=self.steps, guidance=self.guidance,
                                  height=self.height, width=self.width, strength=self.strength,
                                  scheduler=self.scheduler, latent_factor=latent_factor, max_images=max_images)


def initial_noise(seed: int, count: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """[count, C, h, w] noise; image i from its own generator seeded ``seed + i``."""
    out = [torch.randn((1,) + shape, generator=torch.Generator().manual_seed(int(seed) + i)) for i in range(count)]
    return torch.cat(out)


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
) -> np.ndarray:
    """Run the scheduler loop; returns final latents (scaled) [N, C, h, w].

    ``cond``/``uncond`` are [1, 77, D] text embeddings (broadcast to N).
    With ``init_latents`` [1 or N, C, h, w] (template mode), the loop starts
    from the template noised to ``strength`` instead of pure noise."""
    n = req.num_images
    h, w = req.height // latent_factor, req.width // latent_factor
    scheduler = make_scheduler(req.scheduler, scheduler_config)
    scheduler.set_timesteps(req.steps)
    timesteps = scheduler.timesteps
    noise = initial_noise(req.seed, n, (latent_channels, h, w))
    if init_latents is None:
        latents = noise * scheduler.init_noise_sigma
    else:
        init = torch.from_numpy(np.asarray(init_latents, np.float32))
        if init.shape[1:] != (latent_channels, h, w):
            raise InvalidInputError("template", f"latent shape {list(init.shape[1:])} does not match {[latent_channels, h, w]}")
        init = init.expand(n, -1, -1, -1) if init.shape[0] == 1 else init
        start = max(0, min(req.steps - int(round(req.steps * req.strength)), req.steps - 1))
        timesteps = timesteps[start * scheduler.order :]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start * scheduler.order)
        latents = scheduler.add_noise(init, noise, timesteps[:1].repeat(n))
    guided = req.guidance > 1.0
    hidden = np.concatenate([np.repeat(uncond, n, 0), np.repeat(cond, n, 0)]) if guided else np.repeat(cond, n, 0)
    hidden = hidden.astype(np.float32)
    for i, t in enumerate(timesteps):
        model_in = torch.cat([latents, latents]) if guided else latents
        model_in = scheduler.scale_model_input(model_in, t)
        tt = np.full((model_in.shape[0],), float(t), np.float32)
        pred = torch.from_numpy(np.asarray(unet(model_in.numpy().astype(np.float32), tt, hidden)))
        if guided:
            u, c = pred.chunk(2)
            pred = u + req.guidance * (c - u)
        latents = scheduler.step(pred, t, latents, return_dict=False)[0]
        if progress is not None:
            progress(i + 1, len(timesteps))
    return latents.numpy().astype(np.float32)
