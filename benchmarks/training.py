"""LoRA training speed: steps/s on this machine for the tiny default model
and (``--full``) SD-1.5 shapes with random weights for a few steps, in each
training precision side by side: f32, ``auto`` (the per-machine choice: bf16
where the CPU has AMX / AVX-512 bf16) and forced bf16, from the same seed.
Each row's deviation from f32: the largest absolute difference of the
per-step losses, and the relative L2 of the saved LoRA weights (all of them,
and lora_B alone: it starts at zero, so it is all learned).

Run: ``facetron bench training [--full]`` (writes
benchmarks/results/<date>-<machine>-training.{json,md}).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from facetron.benchmarks.report import markdown_table, write_result
from facetron.deviation import rel_l2

#: the precisions compared, f32 first (the reference of the deviations)
PRECISION_RUNS = ("f32", "auto", "bf16")
COLUMNS = ["model", "precision", "chosen", "resolution", "steps", "threads", "first_step_s", "steady_step_s",
           "steps_per_s", "repeats", "speedup_vs_f32", "loss_max_abs_diff", "lora_rel_l2", "lora_B_rel_l2"]


def _dataset(root: Path, resolution: int, count: int = 4) -> Path:
    from facetron.training.dataset import write_dataset

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8) for _ in range(count)]
    return write_dataset(root / "dataset", images, [f"a photo of <facetron-user>, {i}" for i in range(count)])


def measure(base_model: Path | None, steps: int, resolution: int, precision: str = "auto") -> dict:
    """Train ``steps`` LoRA steps (FaceChain settings) in ``precision`` and time them; the first
    step (latent caching, optimizer warm-up) is reported apart."""
    return _train(base_model, steps, resolution, precision)[0]


def _train(base_model: Path | None, steps: int, resolution: int, precision: str) -> tuple[dict, list[float], dict]:
    """(timing row, per-step losses, saved LoRA tensors as float64 numpy) of one run."""
    import torch
    from safetensors.torch import load_file

    from facetron.training.lora_config import LoraTrainConfig
    from facetron.training.train_lora import train_lora

    from facetron.benchmarks.timing import StepTimer

    on_step = StepTimer()

    with tempfile.TemporaryDirectory() as tmp:
        data = _dataset(Path(tmp), resolution)
        t0 = on_step.start()
        result = train_lora(data, Path(tmp) / "loras", user_id="bench", base_model=base_model,
                            config=LoraTrainConfig(steps=steps, checkpoint_every=10**6, resolution=resolution,
                                                   precision=precision),
                            progress=False, callback=on_step)
        total = time.perf_counter() - t0
        weights = {k: v.double().numpy() for k, v in load_file(str(result.lora_path)).items()}
    times = on_step.times
    steady = times[1:] or times
    return {
        "precision": precision,
        "chosen": result.precision.name,
        "why": result.precision.why,
        "steps": steps,
        "resolution": resolution,
        "threads": torch.get_num_threads(),
        "total_s": round(total, 2),
        "first_step_s": round(times[0], 3) if times else None,
        "steady_step_s": round(float(np.median(steady)), 4) if steady else None,
        "steps_per_s": round(1.0 / float(np.median(steady)), 2) if steady else None,
    }, result.losses, weights


def compare_precisions(base_model: Path | None, steps: int, resolution: int, repeats: int = 1) -> dict[str, dict]:
    """One row per :data:`PRECISION_RUNS` entry (same seed, data, noise): timings, speed-up over f32
    and deviation from f32. The precisions run in turn ``repeats`` times (load from other work on the
    machine then falls on each alike); a row keeps its fastest run."""
    runs: dict[str, tuple[dict, list[float], dict]] = {}
    for _ in range(repeats):
        for precision in PRECISION_RUNS:
            attempt = _train(base_model, steps, resolution, precision)
            if precision not in runs or attempt[0]["steady_step_s"] < runs[precision][0]["steady_step_s"]:
                runs[precision] = attempt
    ref_row, ref_losses, ref_weights = runs["f32"]
    keys = sorted(ref_weights)
    b_keys = [k for k in keys if "lora.up" in k or "lora_B" in k]
    rows = {}
    for precision, (row, losses, weights) in runs.items():
        rows[precision] = dict(row, **{
            "repeats": repeats,
            "speedup_vs_f32": round(ref_row["steady_step_s"] / row["steady_step_s"], 3),
            "loss_max_abs_diff": _sig(np.max(np.abs(np.subtract(losses, ref_losses)))),
            "lora_rel_l2": _sig(rel_l2(_flat(weights, keys), _flat(ref_weights, keys))),
            "lora_B_rel_l2": _sig(rel_l2(_flat(weights, b_keys), _flat(ref_weights, b_keys))),
        })
    return rows


def _flat(weights: dict, keys: list[str]) -> np.ndarray:
    return np.concatenate([weights[k].ravel() for k in keys])


def _sig(x: float) -> float:
    """``x`` to 3 significant digits."""
    return float(f"{float(x):.3g}")


def run(full: bool = False) -> dict:
    from facetron.diffusion.base_model import write_base_model
    from facetron.diffusion.model_spec import SD15

    rows = {"tiny": compare_precisions(None, 60, 128, repeats=3)}
    if full:
        with tempfile.TemporaryDirectory() as tmp:
            sd15 = write_base_model(SD15, Path(tmp) / "sd15")
            rows["sd15_shapes_512"] = compare_precisions(sd15, 3, 512)
    md = markdown_table([{"model": model, **row} for model, runs in rows.items() for row in runs.values()], COLUMNS)
    md += (f"\nauto here: {rows['tiny']['auto']['chosen']} ({rows['tiny']['auto']['why']}). Deviations are from "
           "the f32 run of the same seed; steady_step_s is the median step after the first, the fastest of "
           "`repeats` runs taken in turn. "
           "FaceChain's default run is min(200 x photos, 800) steps.\n")
    path = write_result("training", {"training": rows}, md)
    return {"training": rows, "written": str(path)}
