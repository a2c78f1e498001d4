"""The diffusion nets as plain callables with the served contracts (numpy in,
numpy out): BLS calls inside Triton, ONNX Runtime sessions or torch modules
in-process. The denoising loop and the generator take them as they are."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np


@dataclass
class DiffusionNets:
    tokenize: Callable[[list[str]], np.ndarray]  # -> int32 [N,77]
    text_encode: Callable[[np.ndarray], np.ndarray]  # int32 [N,77] -> f32 [N,77,C]
    unet: Callable[..., np.ndarray]  # (sample, timestep, hidden) -> noise_pred
    vae_decode: Callable[[np.ndarray], np.ndarray]  # latent -> uint8 [N,H,W,3]
    vae_encode: Optional[Callable[[np.ndarray], np.ndarray]] = None  # uint8 [N,H,W,3] -> latent
    # step caching (facetron.diffusion.step_cache), where the deployment has the graphs (None: it has not):
    unet_deep: Optional[Callable[..., tuple[np.ndarray, np.ndarray]]] = None  # -> (noise_pred, deep_feature)
    unet_shallow: Optional[Callable[..., np.ndarray]] = None  # (sample, t, hidden, deep_feature) -> noise_pred
    # template mode's ControlNet (facetron.pipeline.control), where the deployment serves one (None: it does not):
    # controlnet(sample, t, hidden, controlnet_cond [B,3,H,W], conditioning_scale [B]) -> {residual name: array};
    # unet_control(sample, t, hidden, residuals) -> noise_pred: the UNet adding them
    controlnet: Optional[Callable[..., dict[str, np.ndarray]]] = None
    unet_control: Optional[Callable[..., np.ndarray]] = None
    latent_channels: int = 4
    latent_factor: int = 8
