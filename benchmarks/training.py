"""LoRA training speed: steps/s on this machine for the tiny default model
and (``--full``) SD-1.5 shapes with random weights for a few steps.

Run: ``facetron bench training [--full]`` (writes
benchmarks/results/<date>-<machine>-training.{json,md}).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from facetron.benchmarks.report import markdown_table, write_result


def _dataset(root: Path, resolution: int, count: int = 4) -> Path:
    from facetron.training.dataset import write_dataset

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8) for _ in range(count)]
    return write_dataset(root / "dataset", images, [f"a photo of <facetron-user>, {i}" for i in range(count)])


def measure(base_model: Path | None, steps: int, resolution: int) -> dict:
    """Train ``steps`` LoRA steps (FaceChain settings) and time them; the first
    step (latent caching, optimizer warm-up) is reported apart."""
    import torch

    from facetron.training.lora_config import LoraTrainConfig
    from facetron.training.train_lora import train_lora

    times: list[float] = []
    last = [time.perf_counter()]

    def on_step(step: int, loss: float, *rest) -> None:
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    with tempfile.TemporaryDirectory() as tmp:
        data = _dataset(Path(tmp), resolution)
        t0 = time.perf_counter()
        last[0] = t0
        train_lora(data, Path(tmp) / "loras", user_id="bench", base_model=base_model,
                   config=LoraTrainConfig(steps=steps, checkpoint_every=10**6, resolution=resolution),
                   progress=False, callback=on_step)
        total = time.perf_counter() - t0
    steady = times[1:] or times
    return {
        "steps": steps,
        "resolution": resolution,
        "threads": torch.get_num_threads(),
        "total_s": round(total, 2),
        "first_step_s": round(times[0], 3) if times else None,
        "steady_step_s": round(float(np.median(steady)), 4) if steady else None,
        "steps_per_s": round(1.0 / float(np.median(steady)), 2) if steady else None,
    }


def run(full: bool = False) -> dict:
    from facetron.diffusion.base_model import write_base_model
    from facetron.diffusion.model_spec import SD15

    rows = {"tiny": measure(None, 60, 128)}
    if full:
        with tempfile.TemporaryDirectory() as tmp:
            sd15 = write_base_model(SD15, Path(tmp) / "sd15")
            rows["sd15_shapes_512"] = measure(sd15, 3, 512)
    md = markdown_table([{"model": k, **v} for k, v in rows.items()],
                        ["model", "resolution", "steps", "threads", "first_step_s", "steady_step_s", "steps_per_s"])
    md += "\nFaceChain's default run is min(200 x photos, 800) steps.\n"
    path = write_result("training", {"training": rows}, md)
    return {"training": rows, "written": str(path)}
