"""The CPU this runs on: model name and the instruction-set flags that decide
which kernels the runtimes use (AVX-512, VNNI, bf16, AMX). Recorded in every
benchmark result and in a repository's runtime choice."""

from __future__ import annotations

import subprocess

FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16",
                     "amx_int8", "amx_tile")


def cpu_description() -> dict:
    """``lscpu``'s model name and flags (+ the flags that decide CPU kernels)."""
    info: dict = {"model": None, "flags": []}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Model name":
            info["model"] = value.strip()
        elif key.strip() == "Flags":
            info["flags"] = value.split()
    if not info["flags"]:  # no lscpu: /proc/cpuinfo has the same flags
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("flags"):
                    info["flags"] = line.split(":", 1)[1].split()
                    break
        except OSError:
            pass
    info["kernel_flags"] = [f for f in FLAGS_OF_INTEREST if f in info["flags"]]
    return info


#: the flags whose bf16 matrix kernels make torch's CPU bf16 autocast faster than float32
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def bf16_fast(flags: list[str] | None = None) -> list[str]:
    """The :data:`BF16_FLAGS` this CPU (or ``flags``) has: non-empty where bf16 matmuls run in hardware."""
    have = cpu_description()["flags"] if flags is None else flags
    return [f for f in BF16_FLAGS if f in have]
