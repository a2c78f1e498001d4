"""How far one output is from another: the numerical deviation measures every
comparison of runtimes, precisions and step caching reports (export's
runtime choice and quantization, the benchmarks, the tests)."""

from __future__ import annotations

import math

import numpy as np


def rel_l2(got: np.ndarray, ref: np.ndarray) -> float:
    """||got - ref|| / ||ref|| in float64 (||got|| when ``ref`` is all zero)."""
    g, r = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    norm = float(np.linalg.norm(r))
    return float(np.linalg.norm(g - r) / norm) if norm else float(np.linalg.norm(g))


def psnr_uint8(got: np.ndarray, ref: np.ndarray) -> float:
    """PSNR in dB of two uint8 images of one shape (``inf`` when identical)."""
    if np.shape(got) != np.shape(ref):
        raise ValueError(f"image shapes differ: {np.shape(got)} vs {np.shape(ref)}")
    mse = float(np.mean((np.asarray(got, np.float64) - np.asarray(ref, np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)
