"""Check exported ONNX models against torch: same seeded inputs, per-output errors.

Each model folder of an export is run in ONNX Runtime (through polygraphy's
``OnnxrtRunner``) and its torch source (the very wrapper module that was
traced) on the same seeded inputs. Per output the report gives

* ``max_abs`` — max |ort - torch|,
* ``max_rel`` — ``max_abs / max|torch|`` (error relative to the output's
  largest magnitude; element-wise ratios explode near zero),
* ``pass`` — ``|ort - torch| <= atol + rtol·|torch|`` everywhere (numpy's
  ``allclose`` rule) with the model's tolerance from :data:`TOLERANCES`.

``vae_decoder`` outputs UINT8 pixels: rounding of values within float error
of a .5 boundary may differ, so its tolerance is one step (atol = 1).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from facetron.atomic import atomic_write_json
from facetron.diffusion.base_model import load_base_model
from facetron.diffusion.lora_inputs import read_lora_manifest
from facetron.errors import InvalidInputError
from facetron.export.merge import merge_loras
from facetron.export.onnx_export import graph_module, read_manifest
from facetron.export.onnx_graph import MODEL_FILE, ModelDims, example_inputs, read_io
from facetron.export.runtime_lora import RuntimeLoraUNet

REPORT_FILE = "validation.json"
# (atol, rtol) per model for fp32 weights; fp16 weights get FP16_TOLERANCES.
TOLERANCES: dict[str, tuple[float, float]] = {
    "text_encoder": (1e-4, 1e-4),
    "unet": (1e-3, 1e-3),
    "unet_lora": (1e-3, 1e-3),
    "vae_encoder": (1e-3, 1e-3),
    "vae_decoder": (1.0, 0.0),  # UINT8 steps
}
TOLERANCES.update({"vae_encoder_tiny": TOLERANCES["vae_encoder"], "vae_decoder_tiny": TOLERANCES["vae_decoder"]})
FP16_TOLERANCES: dict[str, tuple[float, float]] = {
    "text_encoder": (2e-2, 2e-2), "unet": (5e-2, 5e-2), "unet_lora": (5e-2, 5e-2),
    "vae_encoder": (5e-2, 5e-2), "vae_decoder": (3.0, 0.0),
}


def compare(ort_out: np.ndarray, ref: np.ndarray, atol: float, rtol: float) -> dict:
    """Error statistics of one output (see module doc)."""
    if ort_out.shape != ref.shape:
        return {"shape": list(ort_out.shape), "expected_shape": list(ref.shape), "pass": False,
                "error": "shape differs"}
    o, r = ort_out.astype(np.float64), ref.astype(np.float64)
    diff = np.abs(o - r)
    finite = bool(np.isfinite(o).all())
    peak = float(np.abs(r).max()) if r.size else 0.0
    max_abs = float(diff.max()) if diff.size else 0.0
    entry = {
        "shape": list(ref.shape), "dtype": str(ort_out.dtype),
        "max_abs": max_abs, "max_rel": max_abs / peak if peak > 0 else max_abs, "mean_abs": float(diff.mean()),
        "atol": atol, "rtol": rtol, "finite": finite,
        "pass": finite and bool((diff <= atol + rtol * np.abs(r)).all()),
    }
    if np.issubdtype(ort_out.dtype, np.integer):  # pixels: how many differ at all
        entry["frac_differ"] = float((diff > 0).mean())
    return entry


def _torch_module(name: str, base_model, unet, text_encoder, model_dir: Path) -> torch.nn.Module:
    if name == "unet_lora":
        manifest = read_lora_manifest(model_dir)
        module = RuntimeLoraUNet(base_model.unet)
        if module.modules_ != [layer["module"] for layer in manifest["layers"]]:
            raise InvalidInputError(f"export folder {model_dir}", "its lora_manifest.json does not match this UNet")
        return module.eval()
    return graph_module(name, unet=unet, vae=base_model.vae, text_encoder=text_encoder)


def _run_ort(path: Path, feed: dict[str, np.ndarray], providers: Sequence[str]) -> tuple[dict[str, np.ndarray], float]:
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    with OnnxrtRunner(SessionFromOnnx(str(path), providers=list(providers))) as runner:
        runner.infer(feed)  # warm-up (first run allocates)
        t0 = time.perf_counter()
        out = runner.infer(feed)
        ms = (time.perf_counter() - t0) * 1e3
    return {k: np.asarray(v) for k, v in out.items()}, ms


def validate_model(name: str, model_dir: Path, base_model, *, unet=None, text_encoder=None, batch: int = 2,
                   latent: int | None = None, seed: int = 0, providers: Sequence[str] = ("cpu",)) -> dict:
    """Validate one exported model folder; returns its report entry."""
    inputs, outputs, io = read_io(model_dir)
    dims = ModelDims.of(base_model)
    vocab = int(base_model.text_encoder.config.vocab_size)
    feed = example_inputs(inputs, dims, batch=batch, latent=latent, seed=seed, vocab=vocab)
    module = _torch_module(name, base_model, unet if unet is not None else base_model.unet,
                           text_encoder if text_encoder is not None else base_model.text_encoder, model_dir)
    with torch.no_grad():
        t0 = time.perf_counter()
        ref = module(*[torch.from_numpy(feed[s.name]) for s in inputs])
        torch_ms = (time.perf_counter() - t0) * 1e3
    refs = ref if isinstance(ref, (tuple, list)) else (ref,)
    ort_out, ort_ms = _run_ort(model_dir / MODEL_FILE, feed, providers)
    atol, rtol = (FP16_TOLERANCES if io.get("fp16_weights") else TOLERANCES).get(name, (1e-3, 1e-3))
    results = {s.name: compare(ort_out[s.name], r.numpy(), atol, rtol) for s, r in zip(outputs, refs)}
    return {"outputs": results, "pass": all(r["pass"] for r in results.values()),
            "inputs": {k: list(v.shape) for k, v in feed.items() if not k.startswith("lora_")},
            "fp16_weights": bool(io.get("fp16_weights")), "torch_ms": round(torch_ms, 2), "ort_ms": round(ort_ms, 2)}


def load_sources(onnx_dir: str | os.PathLike, base_model_dir: str | os.PathLike | None = None):
    """(base_model, unet, text_encoder) the export was made from, per its manifest.

    A LoRA merge recorded there is redone from the recorded files and weights."""

    source = read_manifest(onnx_dir).get("source") or {}
    path = base_model_dir or (source.get("base_model") or {}).get("path")
    base = load_base_model(path)
    loras = source.get("loras") or []
    if not loras:
        return base, None, None

    by_role = {entry.get("role"): entry for entry in loras}
    face, style = by_role.get("face"), by_role.get("style")
    unet, te = merge_loras(base, face["path"], style["path"] if style else None, w_face=face["weight"],
                           w_style=style["weight"] if style else 0.0)
    return base, unet, te


def validate_export(onnx_dir: str | os.PathLike, *, base_model=None, unet=None, text_encoder=None,
                    models: Sequence[str] | None = None, batch: int = 2, latent: int | None = None, seed: int = 0,
                    providers: Sequence[str] = ("cpu",), report_path: str | os.PathLike | None = None) -> dict:
    """Validate every model of an export folder; write the JSON report atomically.

    ``base_model`` (+ ``unet``/``text_encoder`` for merged weights) default to
    what the export manifest records. ``report_path`` defaults to
    ``<onnx_dir>/validation.json``."""
    onnx_dir = Path(onnx_dir)
    manifest = read_manifest(onnx_dir)
    if base_model is None:
        base_model, unet, text_encoder = load_sources(onnx_dir)
    names = list(models) if models else list(manifest["models"])
    unknown = [n for n in names if n not in manifest["models"]]
    if unknown:
        raise InvalidInputError("--models", f"not in this export: {', '.join(unknown)} "
                                            f"(it has {', '.join(manifest['models'])})")
    report = {"onnx_dir": str(onnx_dir.resolve()), "base_model": str(base_model.path), "batch": batch,
              "latent": latent or ModelDims.of(base_model).latent_size, "seed": seed, "providers": list(providers),
              "rule": "pass if |ort - torch| <= atol + rtol*|torch| everywhere; max_rel = max_abs / max|torch|",
              "models": {}}
    if base_model.is_smoke_model:
        report["note"] = "tiny smoke-test model with random weights: its pictures are not portraits"
    for name in names:
        print(f"[validate] {name} ...", flush=True)
        report["models"][name] = validate_model(name, onnx_dir / name, base_model, unet=unet, text_encoder=text_encoder,
                                                batch=batch, latent=latent, seed=seed, providers=providers)
    report["pass"] = all(m["pass"] for m in report["models"].values())
    atomic_write_json(report_path or onnx_dir / REPORT_FILE, report)
    return report


def summary_lines(report: dict) -> list[str]:
    """One line per output: model, output, max abs / rel error, tolerance, PASS/FAIL."""
    lines = []
    for name, entry in report["models"].items():
        for out, r in entry["outputs"].items():
            if "max_abs" not in r:
                lines.append(f"{name:13s} {out:18s} FAIL ({r.get('error')})")
                continue
            lines.append(f"{name:13s} {out:18s} max_abs={r['max_abs']:.3g} max_rel={r['max_rel']:.3g} "
                         f"(atol={r['atol']:g}, rtol={r['rtol']:g}) {'PASS' if r['pass'] else 'FAIL'}  "
                         f"torch {entry['torch_ms']:.1f} ms / ort {entry['ort_ms']:.1f} ms")
    return lines
