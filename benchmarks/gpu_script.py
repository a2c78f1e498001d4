#!/usr/bin/env python3
"""SD-1.5-shape latency on one GPU — self-contained, for a machine without facetron.

Needs torch (CUDA build) and nothing else; ``onnx`` + ``onnxruntime`` only
for ``--ort``. No diffusers, no transformers, no TensorRT, no Triton, no
network, no facetron import. Copy it together with its sibling
``sd15_nets.py``: the UNet, VAE decoder, CLIP text encoder and DPM-Solver++
scheduler in plain torch, with the state_dict keys, shapes and arithmetic of
diffusers' UNet2DConditionModel / AutoencoderKL / DPMSolverMultistepScheduler
and transformers' CLIPTextModel (``tests/test_gpu_script_nets.py`` checks them
against those libraries on CPU). They are built from SD-1.5 configs with random
weights: timings do not depend on the weight values.

Measures (fp16 on CUDA, warm-up excluded, ``torch.cuda.synchronize`` around
every timed call):

* text encoder, batch 2 (prompt + negative prompt), 77 tokens;
* UNet ms per step, batch 2 (classifier-free guidance), 64×64 latent;
* VAE decode of one 64×64 latent to a 512² uint8 image (on the host);
* one full image: text encoder + ``--steps`` (30) UNet steps with guidance
  and a DPM-Solver++ 2M scheduler step (Karras sigmas, facetron's default
  sampler) + VAE decode. Goal to beat: 1.37 s per
  30-step image; target ≤ 0.7 s on an H100.

Options: ``--cuda-graphs`` (UNet step replayed from a captured CUDA graph),
``--compile`` (torch.compile the UNet; compile time reported apart),
``--channels-last``, ``--ort`` (the UNet exported to ONNX, run in ONNX
Runtime's CUDA provider). Writes ``<date>-<card>-gpu.json`` + ``.md`` in the
format of ``benchmarks/report.py`` (``benchmark``, ``date``, ``machine`` with
the card's name from ``torch.cuda.get_device_name``).

Smoke test without a GPU: ``python benchmarks/gpu_script.py --device cpu --tiny``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling sd15_nets.py, copied with this script
import sd15_nets  # noqa: E402
from sd15_nets import SCHEDULER, SD15, TINY  # noqa: E402,F401

GOAL_S, TARGET_S = 1.37, 0.7
PACKAGES = ("torch", "onnx", "onnxruntime", "onnxruntime-gpu", "numpy")


# ----------------------------------------------------------------------------- environment


# Copied from facetron.benchmarks.machine.machine_info (its package versions): this script imports no facetron
def _versions() -> dict[str, str | None]:
    out = {}
    for pkg in PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _git_sha(override: str | None) -> str:
    if override:
        return override
    if os.environ.get("FACETRON_GIT_SHA"):
        return os.environ["FACETRON_GIT_SHA"]
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def machine(device: torch.device, git: str | None) -> dict:
    """Same keys as benchmarks/machine.py's machine_info, plus the GPU."""
    cpu = platform.processor() or "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "git": _git_sha(git), "packages": _versions()}
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        info["memory_gib"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=torch.cuda.get_device_name(device), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return info


def machine_tag(info: dict) -> str:
    if info.get("gpu"):
        return re.sub(r"[^a-z0-9]+", "-", info["gpu"].lower()).strip("-")
    return f"cpu{info['cores']}c"


# ----------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Seconds per call, synchronised, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def summarize(seconds: list[float]) -> dict[str, float]:
    """Same keys as benchmarks/timing.py's summarize (ms)."""
    ms = sorted(s * 1e3 for s in seconds)

    def pct(p: float) -> float:
        k = (len(ms) - 1) * p / 100
        lo, hi = int(k), min(int(k) + 1, len(ms) - 1)
        return ms[lo] + (ms[hi] - ms[lo]) * (k - lo)

    return {"n": len(ms), "mean_ms": round(sum(ms) / len(ms), 3), "p50_ms": round(pct(50), 3),
            "p90_ms": round(pct(90), 3), "p99_ms": round(pct(99), 3), "min_ms": round(ms[0], 3)}


# ----------------------------------------------------------------------------- models


def build(spec: dict, device: torch.device, dtype: torch.dtype, channels_last: bool):
    """(unet, vae, text_encoder) of sd15_nets with random weights, created directly on ``device``."""
    torch.manual_seed(0)
    with torch.device(device):
        unet = sd15_nets.UNet2DConditionModel(**spec["unet"])
        vae = sd15_nets.AutoencoderKL(**spec["vae"])
        te = sd15_nets.CLIPTextModel(**spec["text_encoder"])
    unet, vae, te = (m.to(device=device, dtype=dtype).eval() for m in (unet, vae, te))
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
        vae = vae.to(memory_format=torch.channels_last)
    return unet, vae, te


class UNetStep:
    """``noise_pred = unet(sample, t, hidden)`` — eager, or replayed from a captured CUDA graph."""

    def __init__(self, unet, sample: torch.Tensor, hidden: torch.Tensor, cuda_graph: bool):
        self.unet, self.graph = unet, None
        self.sample, self.hidden = sample.clone(), hidden.clone()
        self.t = torch.zeros((sample.shape[0],), device=sample.device, dtype=torch.float32)
        if cuda_graph:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    self._eager()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self._eager()

    def _eager(self) -> torch.Tensor:
        return self.unet(self.sample, self.t, self.hidden)

    def __call__(self, sample: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        self.sample.copy_(sample)
        if torch.is_tensor(t):  # a device tensor: copy without a host sync
            self.t.copy_(t.to(self.t.dtype).expand_as(self.t))
        else:
            self.t.fill_(float(t))
        if self.graph is None:
            return self._eager()
        self.graph.replay()
        return self.out


def generate(te, step: UNetStep, vae, scheduler, ids: torch.Tensor, latent: int, steps: int, guidance: float = 7.0,
             seed: int = 0) -> torch.Tensor:
    """One image: text encoder, ``steps`` guided UNet steps, VAE decode → uint8 HWC on the host."""
    device = ids.device
    hidden = te(ids)
    step.hidden.copy_(hidden)
    scheduler.set_timesteps(steps, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn((1, 4, latent, latent), generator=g, device=device, dtype=hidden.dtype) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(torch.cat([x, x]), t)
        uncond, cond = step(inp, t).chunk(2)
        x = scheduler.step(uncond + guidance * (cond - uncond), t, x)
    img = vae.decode(x / vae.scaling_factor)
    return ((img.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)[0].permute(1, 2, 0).cpu()


def ort_unet_ms(unet, sample, t, hidden, device: torch.device, repeats: int, warmup: int) -> dict:
    """UNet exported to ONNX, run by ONNX Runtime (CUDA provider when available)."""
    import numpy as np
    import onnxruntime as ort

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
    with tempfile.TemporaryDirectory(prefix="gpu-bench-onnx-") as tmp:
        path = str(Path(tmp) / "unet.onnx")
        t0 = time.perf_counter()
        torch.onnx.export(_UNetGraph(unet), (sample, t, hidden), path, input_names=["sample", "timestep", "hidden"],
                          output_names=["noise_pred"], opset_version=17, dynamo=False)
        export_s = time.perf_counter() - t0
        sess = ort.InferenceSession(path, providers=providers)
        feed = {"sample": sample.cpu().numpy(), "timestep": t.cpu().numpy().astype(np.float32),
                "hidden": hidden.cpu().numpy()}
        secs = time_calls(lambda: sess.run(None, feed), torch.device("cpu"), repeats, warmup)
    return {"unet_step": summarize(secs), "providers": sess.get_providers(), "export_s": round(export_s, 1),
            "note": "numpy in/out (host copies included)"}


class _UNetGraph(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, hidden):
        return self.unet(sample, timestep, hidden)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--tiny", action="store_true", help="facetron's tiny model shapes instead of SD-1.5 (smoke test)")
    p.add_argument("--dtype", choices=("auto", "fp16", "fp32"), default="auto", help="auto: fp16 on cuda, fp32 on cpu")
    p.add_argument("--steps", type=int, default=30, help="UNet steps per image (default 30)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per net (default 20)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--images", type=int, default=3, help="timed full images (default 3, after one warm-up)")
    p.add_argument("--cuda-graphs", action="store_true", help="replay the UNet step from a CUDA graph")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (compile time reported apart)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--ort", action="store_true", help="also the UNet step in ONNX Runtime (export takes a while)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: $OUT, else benchmarks/results)")
    p.add_argument("--git", default=None, help="git sha to record (default: git rev-parse, $FACETRON_GIT_SHA)")
    return p.parse_args(argv)


def _markdown(doc: dict) -> str:
    m, r = doc["machine"], doc["results"]
    lines = [f"# {doc['benchmark']}\n", f"{doc['shapes']} shapes, random weights, {doc['dtype']}, device "
             f"**{m.get('gpu') or m['cpu']}**, git {m['git']}, torch {m['packages'].get('torch')}, "
             f"nets sd15_nets.py (plain torch), options {doc['options']}.\n",
             "| measure | p50 ms | p90 ms | mean ms | n |", "|---|---|---|---|---|"]
    for key, s in r.items():
        if isinstance(s, dict) and "p50_ms" in s:
            lines.append(f"| {key} | {s['p50_ms']} | {s['p90_ms']} | {s['mean_ms']} | {s['n']} |")
    verdict = "met" if doc["image_s"] <= TARGET_S else "not met"
    if doc["shapes"] != "sd15" or doc["steps"] != 30:
        verdict = "n/a: the goal is for 30 SD-1.5 steps"
    lines.append(f"\nfull {doc['steps']}-step image: **{doc['image_s']} s** (goal to beat {GOAL_S} s, "
                 f"target <= {TARGET_S} s: {verdict})\n")
    for key in ("ort", "compile", "cuda_graphs_error"):
        if key in doc:
            lines.append(f"{key}: `{json.dumps(doc[key])}`\n")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_script: --device cuda but torch sees no CUDA device (use --device cpu --tiny for a smoke test)",
              file=sys.stderr)
        return 2
    if args.cuda_graphs and device.type != "cuda":
        print("gpu_script: --cuda-graphs needs --device cuda", file=sys.stderr)
        return 2
    dtype = {"fp16": torch.float16, "fp32": torch.float32}.get(args.dtype) or (
        torch.float16 if device.type == "cuda" else torch.float32)
    spec = TINY if args.tiny else SD15
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    info = machine(device, args.git)
    print(f"gpu_script: {'tiny' if args.tiny else 'SD-1.5'} shapes, {dtype}, on {info.get('gpu') or info['cpu']}",
          flush=True)
    doc: dict = {"benchmark": "gpu", "date": _dt.datetime.now().isoformat(timespec="seconds"), "machine": info,
                 "shapes": "tiny" if args.tiny else "sd15", "dtype": str(dtype).replace("torch.", ""),
                 "steps": args.steps, "options": {k: getattr(args, k) for k in ("cuda_graphs", "compile", "channels_last")},
                 "goal_s": GOAL_S, "target_s": TARGET_S, "results": {}}
    r = doc["results"]
    with torch.inference_mode():
        t0 = time.perf_counter()
        unet, vae, te = build(spec, device, dtype, args.channels_last)
        doc["build_s"] = round(time.perf_counter() - t0, 1)
        lat, hid = spec["latent"], spec["text_encoder"]["hidden_size"]
        g = torch.Generator(device="cpu").manual_seed(0)
        ids = torch.randint(0, sd15_nets.BOS_ID, (2, sd15_nets.TOKENS), generator=g)
        ids[:, 0], ids[:, -1] = sd15_nets.BOS_ID, sd15_nets.EOS_ID
        ids = ids.to(device)
        sample = torch.randn((2, 4, lat, lat), generator=g).to(device, dtype)
        hidden = torch.randn((2, sd15_nets.TOKENS, hid), generator=g).to(device, dtype)
        latent1 = torch.randn((1, 4, lat, lat), generator=g).to(device, dtype)
        if args.compile:
            t0 = time.perf_counter()
            unet = torch.compile(unet)
            unet(sample, torch.full((2,), 500.0, device=device), hidden)
            _sync(device)
            doc["compile"] = {"first_call_s": round(time.perf_counter() - t0, 1)}
        try:
            step = UNetStep(unet, sample, hidden, cuda_graph=args.cuda_graphs)
        except Exception as exc:  # capture can fail on some op: report it and go on eagerly
            doc["cuda_graphs_error"] = f"{type(exc).__name__}: {exc}"
            step = UNetStep(unet, sample, hidden, cuda_graph=False)
        w, n = args.warmup, args.repeats
        r["text_encoder_b2"] = summarize(time_calls(lambda: te(ids), device, n, w))
        r["unet_step_b2"] = summarize(time_calls(lambda: step(sample, 500.0), device, n, w))
        r["vae_decode_b1"] = summarize(time_calls(
            lambda: vae.decode(latent1 / vae.scaling_factor), device, max(1, n // 2), w))
        scheduler = sd15_nets.DPMSolverMultistepScheduler(**SCHEDULER)
        image = lambda: generate(te, step, vae, scheduler, ids, lat, args.steps)  # noqa: E731
        r[f"image_{args.steps}_steps"] = summarize(time_calls(image, device, args.images, 1))
        doc["image_s"] = round(r[f"image_{args.steps}_steps"]["p50_ms"] / 1e3, 3)
        doc["unet_share_of_image"] = round(args.steps * r["unet_step_b2"]["p50_ms"] / r[f"image_{args.steps}_steps"]["p50_ms"], 3)
        if device.type == "cuda":
            doc["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if args.ort:
        try:
            with torch.no_grad():
                doc["ort"] = ort_unet_ms(unet, sample.clone(), torch.full((2,), 500.0, device=device),
                                         hidden.clone(), device, max(3, n // 2), w)
        except Exception as exc:
            doc["ort"] = {"error": f"{type(exc).__name__}: {exc}"}
    out_dir = args.out or Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{_dt.date.today().isoformat()}-{machine_tag(info)}-gpu{'-tiny' if args.tiny else ''}"
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    stem.with_suffix(".md").write_text(_markdown(doc))
    print(json.dumps({k: doc[k] for k in ("shapes", "dtype", "options", "results", "image_s")}, indent=1))
    print(f"gpu_script: {args.steps}-step image {doc['image_s']} s (goal {GOAL_S} s, target {TARGET_S} s); "
          f"wrote {stem.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
