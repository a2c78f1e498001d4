"""CPU runtimes side by side per diffusion net: torch eager, ONNX Runtime,
OpenVINO fp32 (dynamic and static shapes), OpenVINO with int8 weight
compression (``nncf.compress_weights``, no calibration data) and OpenVINO's
bf16 precision hint (fast only where the CPU has AMX), beside torch's own
bf16 (``torch_bf16``: autocast, the yardstick of bf16 error the ``auto``
rule uses).

Per net: ms per call (a UNet call at batch 2 is one guidance step, so its ms
is the per-step cost), the ratio to torch eager and to ONNX Runtime, and each
runtime's deviation from torch eager on the same seeded inputs (max abs and
relative L2 = ||x - torch|| / ||torch||). The calls of one group run
interleaved (A B C A B C ...) in one process, so machine drift hits every
runtime alike; read the ratios, not the absolute times.

* ``openvino_int8_full_static`` / ``openvino_int8_hybrid_static``: int8
  weights *and* activations (``nncf.quantize``, :mod:`facetron.export.quantize`:
  ``full`` quantizes every op NNCF quantizes, ``hybrid`` is the SD recipe of
  OpenVINO's notebooks: int8-compressed MatMul weights, full int8 Convolutions
  and attention MatMuls; the LoRA MatMuls stay f32), calibrated at the run's
  shapes: the UNets on the inputs of real denoising trajectories
  (``calibration_feeds``: 2 prompts x 25 steps in ONNX Runtime fp32), the other
  nets on 4 seeded example inputs (speed; their deviation is indicative only);
  ``calibration`` and ``quantize_s`` in each row;
* ``openvino_served``: OpenVINO as a served model opens it (``open_runtime``:
  a static graph per feed shape, compiled on first use; the runtime-LoRA
  graph with ``reuse_inputs``, its UNet inputs new array objects per call);
* default: the tiny model (seconds), every net, every variant in one group;
* ``full``: SD-1.5 shapes (random weights: speed and numerical deviation
  only, the pictures mean nothing). A full UNet in torch + ORT + OpenVINO at
  once nearly fills 24 GiB, so each net runs in groups that each hold torch
  as the anchor (ratios compare within a group), and the OpenVINO variants
  use static shapes (the served resolution). Minutes of both cores and
  ~15 GB of memory: run it alone (``facetron bench runtimes --full``); the
  int8 group adds the UNet's calibration trajectories (50 ONNX Runtime
  calls) and two NNCF quantizations (estimated 25-35 min on 2 cores).

The thread count is the served one (``NetParams.intra_op_threads`` = 2) for
every runtime. OpenVINO compiles with ``INFERENCE_PRECISION_HINT=f32`` (its
bf16 default is slower and less exact on CPUs without AMX) except the
``bf16`` variant, the LATENCY hint,
no compiled-model cache (compile time is reported as ``open_s``).
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from facetron.cpu_info import cpu_description  # noqa: F401 - re-exported: every bench records the CPU

NETS = ("text_encoder", "unet", "unet_lora", "vae_decoder", "vae_encoder")
FULL_NETS = ("unet", "text_encoder", "vae_decoder")
VARIANTS = ("torch", "torch_bf16", "onnxruntime", "openvino_fp32", "openvino_fp32_static", "openvino_served",
            "openvino_int8w", "openvino_bf16_static", "openvino_int8_full_static", "openvino_int8_hybrid_static")
#: SD-1.5 shapes: torch is every group's anchor; one full UNet per runtime at a time
FULL_GROUPS = (("torch", "onnxruntime", "openvino_fp32_static"), ("torch", "openvino_int8w_static"),
               ("torch", "torch_bf16", "openvino_bf16_static"))
#: SD-1.5 shapes, ``--int8``: calibrated int8 (calibration trajectories + two NNCF quantizations: +25-35 min)
FULL_INT8_GROUPS = (("torch", "openvino_int8_full_static", "openvino_int8_hybrid_static"),)
#: the served candidates of ``export repository --cpu-runtime auto --precision auto`` (export/runtime_choice.py)
AUTO_CANDIDATES = {"onnxruntime": "f32", "openvino_fp32_static": "f32", "openvino_bf16_static": "bf16"}
#: int8 variants calibrated on data (weights and activations): the UNets' calibration trajectories, each 25 steps
INT8_CALIBRATED = ("openvino_int8_full_static", "openvino_int8_hybrid_static")
INT8_CALIBRATION_PROMPTS = 2
INT8_CALIBRATION_SEEDS = 4  # the other nets: seeded example inputs


def deviation(got: np.ndarray, ref: np.ndarray) -> dict:
    """max |got - ref| and relative L2 ||got - ref|| / ||ref|| (float64)."""
    g, r = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if g.shape != r.shape:
        return {"error": f"shape {list(g.shape)} vs torch {list(r.shape)}"}
    norm = float(np.linalg.norm(r))
    return {"max_abs": float(np.abs(g - r).max()), "rel_l2": float(np.linalg.norm(g - r) / norm) if norm else None}


def _nets(spec: str):
    from facetron.benchmarks.ort_vs_torch import _nets as build

    return build(spec)


def _torch_call(name: str, base, inputs, feed):
    import torch

    from facetron.export.onnx_export import graph_module
    from facetron.export.runtime_lora import RuntimeLoraUNet

    module = (RuntimeLoraUNet(base.unet).eval() if name == "unet_lora"
              else graph_module(name, unet=base.unet, vae=base.vae, text_encoder=base.text_encoder))
    args = [torch.from_numpy(feed[s.name]) for s in inputs]

    def call():
        with torch.no_grad():
            return module(*args).numpy()

    def call_bf16():  # torch's own bf16 (autocast): the oracle of the bf16 tolerance
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return module(*args).float().numpy()

    call.bf16 = call_bf16
    return call


def _export(name: str, base, dims, out: Path) -> Path:
    from facetron.export.onnx_export import export_model
    from facetron.export.runtime_lora import export_runtime_lora_unet

    if name == "unet_lora":
        return export_runtime_lora_unet(base.unet, out, dims=dims, rank=16)
    return export_model(name, out, dims=dims, unet=base.unet, vae=base.vae, text_encoder=base.text_encoder)


def _feed(name: str, path: Path, dims, batch: int, latent: int | None, seed: int = 0) -> tuple[list, dict]:
    from facetron.diffusion.lora_inputs import random_lora_inputs, read_lora_manifest
    from facetron.export.onnx_graph import example_inputs, read_io

    inputs, _, _ = read_io(path.parent)
    feed = example_inputs(inputs, dims, batch=batch, latent=latent, seed=seed)
    if name == "unet_lora":  # a non-zero LoRA at the export rank (face + style, 16), as served
        feed.update(random_lora_inputs(read_lora_manifest(path.parent), batch, seed=1))
    return inputs, feed


def _calibration(name: str, base, dims, path: Path, feed: dict, batch: int, latent: int | None,
                 threads: int) -> tuple[list, str]:
    """(calibration feeds at this run's shapes, what they are) of the ``INT8_CALIBRATED`` variants: a UNet's
    inputs along real denoising trajectories (its text encoder exported beside it, the run's LoRA inputs),
    any other net's seeded example inputs."""
    from facetron.export import quantize

    if name not in ("unet", "unet_lora"):
        feeds = [_feed(name, path, dims, batch, latent, seed)[1]
                 for seed in range(1, 1 + INT8_CALIBRATION_SEEDS)]
        return feeds, f"{len(feeds)} seeded example inputs (not trajectories)"
    nets = quantize.ExportedNets(unet=path, text_encoder=_export("text_encoder", base, dims, path.parent.parent),
                                 vae_decoder=None, scheduler_config=quantize.sd15_scheduler_config(),
                                 resolution=feed["sample"].shape[-1] * dims.latent_factor,
                                 latent_channels=dims.latent_channels, latent_factor=dims.latent_factor)
    cal = quantize.calibration_feeds(nets, quantize.CALIBRATION_PROMPTS[:INT8_CALIBRATION_PROMPTS], threads=threads,
                                     lora={k: v for k, v in feed.items() if k.startswith("lora_")})
    return cal.feeds, f"{len(cal.feeds)} UNet inputs of {len(cal.prompts)} denoising trajectories"


def _open(variant: str, path: Path, feed: dict, threads: int, calibration: tuple[list, str] | None = None):
    """(callable, info) of one non-torch variant (``calibration``: :func:`_calibration`, int8 variants)."""
    from facetron.net_runtimes import OpenVinoRuntime, open_runtime, openvino_model

    info: dict = {}
    t0 = time.perf_counter()
    if variant == "onnxruntime":
        net = open_runtime(path, "onnxruntime", threads)
    elif variant == "openvino_served":
        # what a served model opens: a static graph per feed shape (LRU) and, for the LoRA graph, reuse_inputs;
        # the non-LoRA inputs alternate between two copies (new array objects every call, as in a denoising loop)
        lora = any(k.startswith("lora_") for k in feed)
        net = open_runtime(path, "openvino", threads, fallback=False, cache=False, reuse_inputs=lora)
        feeds = [feed, {k: (v if k.startswith("lora_") else v.copy()) for k, v in feed.items()}]
        turn = [0]

        def call():
            turn[0] ^= 1
            return net.run(out_names, feeds[turn[0]])[0]

        out_names = net.output_names()[:1]
        call()  # compile this shape's static graph (timed in open_s)
        info["open_s"] = round(time.perf_counter() - t0, 2)
        return call, info, net
    else:
        static = {k: list(v.shape) for k, v in feed.items()} if "static" in variant else None
        model = openvino_model(path, static)
        if "int8w" in variant:
            import nncf

            t1 = time.perf_counter()
            model = nncf.compress_weights(model)  # int8 weights (asymmetric, per channel), activations fp32
            info["compress_s"] = round(time.perf_counter() - t1, 2)
        elif variant in INT8_CALIBRATED:
            from facetron.export.quantize import quantize_model

            feeds, what = calibration or ([], "no calibration data")
            if not feeds:
                raise RuntimeError(what)
            t1 = time.perf_counter()
            model, _ = quantize_model(model, feeds, variant.split("_")[2])
            info.update(quantize_s=round(time.perf_counter() - t1, 2), calibration=what)
        precision = "bf16" if "bf16" in variant else "f32"
        net = OpenVinoRuntime(path, threads, model=model, cache=None, precision=precision)
    info["open_s"] = round(time.perf_counter() - t0, 2)
    out_names = net.output_names()[:1]
    return (lambda: net.run(out_names, feed)[0]), info, net


def measure_net(name: str, spec: str = "tiny", *, repeats: int = 10, threads: int = 2, batch: int | None = None,
                latent: int | None = None, groups: Sequence[Sequence[str]] = (VARIANTS,),
                work_dir: Path | None = None) -> dict:
    """One net: each group's variants timed interleaved; deviations vs torch eager."""
    import torch

    from facetron.benchmarks.timing import interleaved, summarize

    base, dims = _nets(spec)
    batch = batch or (2 if name in ("unet", "unet_lora", "text_encoder") else 1)
    result: dict = {"net": name, "spec": spec, "batch": batch, "latent": latent or dims.latent_size,
                    "threads": threads, "repeats": repeats, "variants": {}, "groups": [list(g) for g in groups]}
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(dir=work_dir, prefix="facetron-bench-rt-") as tmp:
            t0 = time.perf_counter()
            path = _export(name, base, dims, Path(tmp))
            result["export_s"] = round(time.perf_counter() - t0, 2)
            inputs, feed = _feed(name, path, dims, batch, latent)
            result["shapes"] = {k: list(v.shape) for k, v in feed.items() if not k.startswith("lora_")}
            torch_call = _torch_call(name, base, inputs, feed)
            ref = torch_call()
            calibration = None
            if any(v in INT8_CALIBRATED for g in groups for v in g):
                try:
                    calibration = _calibration(name, base, dims, path, feed, batch, latent, threads)
                except Exception as exc:  # noqa: BLE001 - the int8 variants' rows then carry the reason
                    calibration = ([], f"calibration failed: {type(exc).__name__}: {exc}"[:300])
            for group in groups:
                calls, held = {}, []
                for variant in group:
                    if variant == "torch":
                        calls[variant] = torch_call
                        result["variants"].setdefault("torch", {"max_abs": 0.0, "rel_l2": 0.0})
                        continue
                    if variant == "torch_bf16":
                        calls[variant] = torch_call.bf16
                        result["variants"][variant] = deviation(torch_call.bf16(), ref)
                        continue
                    try:
                        call, info, net = _open(variant, path, feed, threads, calibration)
                        out = call()
                    except Exception as exc:  # noqa: BLE001 - one variant failing is a result, not a crash
                        result["variants"][variant] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
                        continue
                    held.append(net)
                    calls[variant] = call
                    result["variants"][variant] = {**info, **deviation(out, ref)}
                samples = interleaved(calls, repeats=repeats, warmup=1)
                torch_ms = summarize(samples["torch"])["p50_ms"] if "torch" in samples else None
                for variant, s in samples.items():
                    stats = summarize(s)
                    entry = result["variants"][variant]
                    entry.setdefault("timing", {})[f"group{groups.index(group)}"] = stats
                    if variant == "torch":
                        entry.setdefault("ms", stats["p50_ms"])
                    else:
                        entry["ms"] = stats["p50_ms"]
                        entry["over_torch"] = round(stats["p50_ms"] / torch_ms, 3) if torch_ms else None
                del calls, held, samples
                gc.collect()
    finally:
        torch.set_num_threads(old_threads)
    ort_ms = result["variants"].get("onnxruntime", {}).get("ms")
    for variant, entry in result["variants"].items():
        if ort_ms and entry.get("ms"):
            entry["over_onnxruntime"] = round(entry["ms"] / ort_ms, 3)
    result["auto_choice"] = auto_choice(result["variants"])
    return result


def auto_choice(variants: dict) -> dict | None:
    """The auto rule applied per call to these numbers (export/runtime_choice.py's rule, with torch as the
    fp32 reference): fp32 candidates within 1e-3 rel. L2 of torch, the bf16 one within ``BF16_FACTOR`` x
    torch's own bf16 deviation of the call; ONNX Runtime unless an eligible candidate is >= 5 % faster. For
    the nets that run once per image this is the assembly's rule; the UNet's bf16 is judged at assembly by
    a short generation's final latents instead (a call's deviation compounds differently over the steps:
    ``facetron bench portrait`` measures whole images). None when ONNX Runtime was not measured."""
    from facetron.export.runtime_choice import BF16_FACTOR, pick

    if "ms" not in variants.get("onnxruntime", {}):
        return None
    torch_bf16 = variants.get("torch_bf16", {}).get("rel_l2")
    eligible = {}
    for name, precision in AUTO_CANDIDATES.items():
        e = variants.get(name, {})
        if "ms" not in e or e.get("rel_l2") is None:
            continue
        limit = 1e-3 if precision == "f32" else (BF16_FACTOR * torch_bf16 if torch_bf16 else None)
        if limit is not None and e["rel_l2"] <= limit:
            eligible[name] = e["ms"]
    return {"choice": pick(eligible, "onnxruntime"), "eligible_ms": eligible, "torch_bf16_rel_l2": torch_bf16,
            "rule": "fastest eligible; onnxruntime unless >= 5% faster; bf16 within 2x torch's own bf16 deviation"}


def run(full: bool = False, repeats: int | None = None, nets: Sequence[str] | None = None, threads: int = 2,
        out_dir: Path | None = None, write: bool = True, int8: bool = False) -> dict:
    """The benchmark: tiny (default) or SD-1.5 shapes (``full``; ``int8`` adds the calibrated int8 group);
    writes JSON + MD + PNG."""
    from facetron.benchmarks.report import markdown_table, write_result

    spec = "sd15" if full else "tiny"
    nets = tuple(nets or (FULL_NETS if full else NETS))
    repeats = repeats or (3 if full else 20)
    groups = (FULL_GROUPS + (FULL_INT8_GROUPS if int8 else ())) if full else (VARIANTS,)
    t0 = time.perf_counter()
    result: dict = {"spec": spec, "cpu": cpu_description(), "threads": threads, "repeats": repeats,
                    "loadavg_start": _loadavg(), "nets": {}, "versions": _versions()}
    if spec == "tiny":
        result["note"] = "tiny smoke-test model with random weights: ratios of tiny graphs (ms per call), not SD-1.5"
    else:
        result["note"] = "SD-1.5 shapes with random weights: speed and numerical deviation only"
    for name in nets:
        print(f"[bench runtimes] {name} ({spec}) ...", flush=True)
        result["nets"][name] = measure_net(name, spec, repeats=repeats, threads=threads, groups=groups)
        gc.collect()
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    result["loadavg_end"] = _loadavg()
    rows = []
    for name, r in result["nets"].items():
        for variant, e in r["variants"].items():
            rows.append({"net": name, "variant": variant, "ms/call": e.get("ms", ""), "x torch": e.get("over_torch", ""),
                         "x ORT": e.get("over_onnxruntime", ""),
                         "max abs vs torch": _g(e.get("max_abs")), "rel L2 vs torch": _g(e.get("rel_l2")),
                         "open s": e.get("open_s", ""), "error": e.get("error", "")})
    md = (f"{result['note']}.\n\nCPU: {result['cpu']['model']}; kernel flags: "
          f"{', '.join(result['cpu']['kernel_flags']) or 'none'}; {threads} threads per runtime; p50 of {repeats} "
          f"interleaved calls per variant; batch 2 for text_encoder/unet (one guidance step), 1 for the VAEs.\n\n"
          + markdown_table(rows, ["net", "variant", "ms/call", "x torch", "x ORT", "max abs vs torch",
                                  "rel L2 vs torch", "open s", "error"])
          + "\nThe auto rule per call (what `export repository --cpu-runtime auto --precision auto` serves for the "
            "nets that run once per image; its UNet bf16 check is a short generation's final latents, see "
            "`facetron bench portrait`): "
          + ", ".join(f"{n} **{r['auto_choice']['choice']}**" for n, r in result["nets"].items() if r.get("auto_choice"))
          + " (fp32 within 1e-3 rel. L2 of torch, bf16 within 2x torch's own bf16 deviation, ONNX Runtime unless "
            "another is >= 5 % faster).\n"
          + f"\nwall time {result['wall_s']} s; load average {result['loadavg_start']} -> {result['loadavg_end']} "
            f"(above 2 on 2 cores, other work shared the cores: torch eager's OpenMP threads suffer most)\n")
    if write:
        name = f"runtimes-{spec}"
        json_path = write_result(name, result, md, out_dir=out_dir)
        png = _plot(result, json_path.with_name(json_path.stem + ".png"))
        result["files"] = [str(json_path), str(json_path.with_suffix(".md"))] + ([str(png)] if png else [])
    return result


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _g(v) -> str:
    return "" if v is None else f"{v:.3g}"


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "onnxruntime", "openvino", "nncf"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _plot(result: dict, path: Path) -> Path | None:
    from facetron.benchmarks.machine import machine_info
    from facetron.benchmarks.plots import footer_text, plot_ratios

    ratios = [(f"{name}: {variant} / torch", e.get("over_torch"))
              for name, r in result["nets"].items() for variant, e in r["variants"].items() if variant != "torch"]
    if not any(v for _, v in ratios):
        return None
    return plot_ratios(ratios, path, footer_text(machine_info()) + f" | openvino {result['versions'].get('openvino')}")
