"""Step caching (DeepCache, Ma et al. 2023, arXiv 2312.00858) on the sampler side.

Adjacent denoising steps change the UNet's deep features little. With a
cache interval ``N``, step ``i`` of a generation is

* **full** when ``i % N == 0`` (:func:`is_full_step`): the whole UNet runs
  (the full graph: the served ``unet``'s ``model.onnx``) and returns, besides ``noise_pred``, the
  hidden state that enters the UNet's last up block (:data:`DEEP_FEATURE`);
* **shallow** otherwise: only ``conv_in``, the time embedding,
  ``down_blocks[0]``, ``up_blocks[-1]`` (fed the cached feature and the fresh
  skip connections) and the output layers run (the shallow graph, ``unet/1/shallow/``).

``N = 1`` is off: every step is full and :func:`step_cached` hands back the
plain UNet callable itself, so the loop is the uncached one bit for bit.
A generation of ``S`` steps makes :func:`full_step_count` = ``ceil(S / N)``
full evaluations.

:class:`CachedUNet` turns the two graphs into the plain ``unet(sample,
timestep, hidden)`` callable :func:`facetron.diffusion.sampler.denoise`
takes, so the loop itself is unchanged. Numpy only (no torch): the server
can import it. One concept at two layers: the torch graphs and their
export (and the exported folder names) are :mod:`facetron.export.step_cache_graphs`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import numpy as np

from facetron import contract
from facetron.errors import InvalidInputError

#: the cached tensor: output of the full graph, input of the shallow graph (the contract's name)
DEEP_FEATURE = contract.DEEP_FEATURE

FullFn = Callable[..., tuple[np.ndarray, np.ndarray]]  # (sample, t, hidden, **extra) -> (noise_pred, deep_feature)
ShallowFn = Callable[..., np.ndarray]  # (sample, t, hidden, deep_feature, **extra) -> noise_pred
UNetFn = Callable[..., np.ndarray]  # (sample, t, hidden, **extra) -> noise_pred


def check_interval(interval: Any) -> int:
    """``interval`` as an int >= 1 (1 = caching off), else InvalidInputError."""
    if isinstance(interval, bool) or not isinstance(interval, (int, np.integer)) or int(interval) < 1:
        raise InvalidInputError("cache_interval", f"must be an integer >= 1 (1 = off), got {interval!r}")
    return int(interval)


def is_full_step(i: int, interval: int) -> bool:
    """The uniform schedule: step ``i`` (0-based) runs the whole UNet iff ``i % interval == 0``."""
    return int(i) % check_interval(interval) == 0


def full_step_count(steps: int, interval: int) -> int:
    """Full UNet evaluations of a ``steps``-step generation: ``ceil(steps / interval)``."""
    return math.ceil(int(steps) / check_interval(interval))


class CachedUNet:
    """A plain ``unet(sample, timestep, hidden, **extra)`` callable over the two graphs.

    Call ``i`` of a generation runs ``full_fn`` (and keeps its feature) when
    :func:`is_full_step`, else ``shallow_fn`` with the kept feature. A new
    generation starts at :meth:`reset`, and also by itself when a call's
    timestep is above the previous call's (every scheduler walks the
    timesteps downward, so a rise is the first step of the next generation)
    or its batch/latent shape differs from the kept feature's: a feature is
    never reused across generations. ``full_calls`` / ``shallow_calls``
    count evaluations since construction or :meth:`reset`."""

    def __init__(self, full_fn: FullFn, shallow_fn: ShallowFn, interval: int):
        self.full_fn, self.shallow_fn = full_fn, shallow_fn
        self.interval = check_interval(interval)
        self.reset()

    def reset(self) -> None:
        """Forget the kept feature and zero the step index and the counters."""
        self._restart()
        self.full_calls = 0
        self.shallow_calls = 0

    def _restart(self) -> None:
        self.step = 0
        self.feature: Optional[np.ndarray] = None
        self._last_t: Optional[float] = None
        self._shape: Optional[tuple[int, ...]] = None

    def _is_new_generation(self, sample: np.ndarray, timestep: np.ndarray) -> bool:
        t = float(np.max(timestep))
        return self._last_t is not None and (t > self._last_t or np.shape(sample) != self._shape)

    def __call__(self, sample: np.ndarray, timestep: np.ndarray, hidden: np.ndarray, **extra) -> np.ndarray:
        if self._is_new_generation(sample, timestep):
            self._restart()
        if is_full_step(self.step, self.interval) or self.feature is None:
            pred, self.feature = self.full_fn(sample, timestep, hidden, **extra)
            self.full_calls += 1
        else:
            pred = self.shallow_fn(sample, timestep, hidden, self.feature, **extra)
            self.shallow_calls += 1
        self.step += 1
        self._last_t, self._shape = float(np.max(timestep)), np.shape(sample)
        return pred


def step_cached(unet: UNetFn, full_fn: FullFn, shallow_fn: ShallowFn, interval: int) -> UNetFn:
    """The UNet callable for ``denoise`` at cache ``interval``: ``unet`` itself at
    1 (off: the uncached loop, bit for bit), else a :class:`CachedUNet`."""
    return unet if check_interval(interval) == 1 else CachedUNet(full_fn, shallow_fn, interval)

