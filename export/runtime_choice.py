"""``--cpu-runtime auto``: each net's runtime and precision, measured on the machine that assembles.

Candidates per net: ONNX Runtime fp32 (the validated default), OpenVINO fp32
and — with ``precision="auto"`` on a CPU with bf16 matrix kernels
(:data:`facetron.cpu_info.BF16_FLAGS`; elsewhere the entry says why not,
``bf16_skipped``) — OpenVINO bf16. Each is opened as the served
model opens it (:func:`facetron.net_runtimes.open_runtime`; the
runtime-LoRA UNet with ``reuse_inputs`` and its ONNX Runtime arena kept) and
called a few times at the served shapes (:meth:`DiffusionSource.served_feed`).
**One net's runtime is open at a time** (an SD-1.5 UNet holds ~3.4 GB of
weights in each runtime, and an OpenVINO compile holds the read graph beside
the compiled one): ONNX Runtime fp32, the reference, is timed before and
after each candidate (R, C1, R, C2, R: one reference block more than
candidates), and each runtime is closed and its memory handed back to the
system (:func:`facetron.net_runtimes.release_heap`) before the next opens.
Torch's own bf16 (the yardstick below) is computed first, with only that
net's torch module loaded, and freed before any runtime opens.

Eligibility, against outputs the candidates did not produce:

1. **fp32**: equal to ONNX Runtime's outputs within the export validation
   tolerance (:data:`facetron.export.validate.TOLERANCES`).
2. **bf16**: its deviation from ONNX Runtime fp32 **in what reaches the
   image** is at most :data:`BF16_FACTOR` x that of **torch's own bf16**
   (``torch.autocast`` on CPU, the mainstream bf16 inference of these nets)
   from torch fp32: bf16 is accepted for exactly the error bf16 arithmetic
   brings, not for a runtime that adds its own. The text encoder and the VAEs
   run once per image, so their call is what reaches it (rel. L2 of the
   output on the served feed). The UNet runs every step: it is judged by the
   final latents of a short generation (:data:`IMAGE_CHECK_STEPS` steps of
   facetron's sampler at the served shapes, the same LoRA, noise and
   embeddings for ONNX Runtime fp32, OpenVINO bf16 and torch autocast) —
   per call, OpenVINO's bf16 UNet deviated 2.7x torch's at SD-1.5 (it keeps
   more activations in bf16), yet its whole image deviated like torch's
   (final latents 0.0091 vs 0.0074 rel. L2, PSNR 50.6 vs 50.2 dB over 25
   steps: benchmarks/results/2026-12-01-cpu2c-portrait-sd15-bf16.md). The
   per-call numbers are recorded too. Whether bf16 suits a product at all
   is the precision choice (``--precision``): OpenVINO itself defaults to
   bf16 on CPUs with AMX; facetron asks for it only with ``auto`` / ``bf16``
   and reports each image's deviation in ``facetron bench portrait``.

Choice: ONNX Runtime unless an eligible candidate is at least
``1 - AUTO_MARGIN`` faster (its p50 over the mean of ONNX Runtime's p50 in
the blocks just before and after it); then the fastest eligible one. The
report (numbers, deviations, rule) goes to ``runtime_choice.json``. A
measured entry is kept per kind of machine and net architecture
(:mod:`facetron.export.runtime_choice_cache`) and reused by
:func:`choose_runtimes` when its key matches.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable, Protocol

import numpy as np

from facetron.contract import DEFAULT_NET_PRECISION, DEFAULT_NET_RUNTIME, MODEL_FILE, NetParams
from facetron.cpu_info import BF16_FLAGS, bf16_fast, cpu_description
from facetron.deviation import rel_l2
from facetron.errors import InvalidInputError
from facetron.net_runtimes import DEFAULT_ORT_MEMORY, UNET_ORT_MEMORY, open_runtime, release_heap



class NetSource(Protocol):
    """What the choice needs of the exported nets (``export.diffusion_source.DiffusionSource``)."""

    def net_folder(self, name: str) -> Path: ...

    def served_feed(self, name: str, seed: int = 0) -> dict[str, np.ndarray]: ...

    def torch_net(self, name: str) -> tuple:
        """(torch module, graph inputs) of net ``name``, loaded for this call: the caller drops it."""

    @property
    def scheduler_config(self) -> dict: ...

    @property
    def latent_factor(self) -> int: ...

#: ``auto`` keeps ONNX Runtime (the validated default) unless another candidate is at least this much faster
AUTO_MARGIN = 0.95
#: ``--precision``: f32 only, bf16 (OpenVINO bf16 for every net), or auto (bf16 a candidate of ``auto``)
PRECISION_CHOICES = ("f32", "bf16", "auto")
#: a bf16 candidate may deviate from fp32 at most this many times as much as torch's bf16 does
BF16_FACTOR = 2.0
#: the UNet's bf16 check: steps of a short generation whose final latents are compared
IMAGE_CHECK_STEPS = 10
#: (runtime, precision) candidates
FP32_CANDIDATES = (("onnxruntime", "f32"), ("openvino", "f32"))
BF16_CANDIDATE = ("openvino", "bf16")
DEFAULT = (DEFAULT_NET_RUNTIME, DEFAULT_NET_PRECISION)
#: why ``auto`` measures no bf16 candidate on a CPU without bf16 matrix kernels
BF16_SKIPPED = (f"not measured: this CPU has none of {', '.join(BF16_FLAGS)}: OpenVINO compiles a bf16 hint to f32 "
                f"and torch's bf16 yardstick runs emulated (an SD-1.5 UNet choice spent over 55 min in it on an AVX2 "
                f"EPYC without finishing)")


def cpu_flags() -> dict:
    """The CPU model and its kernel-deciding flags (the choice holds for this kind of machine)."""
    info = cpu_description()
    return {"model": info["model"], "kernel_flags": info["kernel_flags"]}


def bf16_measured(precision: str) -> bool:
    """Whether ``precision`` makes OpenVINO bf16 a candidate here: ``auto`` on a CPU with bf16 matrix kernels
    (:func:`facetron.cpu_info.bf16_fast`); elsewhere a choice's entry says ``bf16_skipped``."""
    return precision == "auto" and bool(bf16_fast())


def check_precision_choice(precision: str) -> str:
    if precision not in PRECISION_CHOICES:
        raise InvalidInputError("--precision", f"expected one of {', '.join(PRECISION_CHOICES)}, got {precision!r}")
    return precision


def label(candidate: tuple[str, str]) -> str:
    runtime, precision = candidate
    return runtime if precision == "f32" else f"{runtime}_{precision}"


def torch_bf16_deviation(module, inputs, feed: dict[str, np.ndarray]) -> float:
    """rel L2 of torch's bf16 (``torch.autocast`` on CPU) vs torch fp32 of ``module`` (a net's torch oracle,
    :meth:`NetSource.torch_net`, taking ``inputs``) on ``feed``."""
    import torch

    args = [torch.from_numpy(np.ascontiguousarray(feed[s.name])) for s in inputs]
    with torch.no_grad():
        ref = module(*args)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = module(*args)
    ref, low = (x[0] if isinstance(x, (tuple, list)) else x for x in (ref, low))
    return rel_l2(low.float().numpy(), ref.float().numpy())


def generation_latents(source: NetSource, feed: dict[str, np.ndarray], unet, steps: int = IMAGE_CHECK_STEPS
                       ) -> np.ndarray:
    """Final latents of a ``steps``-step generation (facetron's sampler, the served shapes, ``feed``'s noise
    and embeddings) with ``unet``, a callable ``(sample, timestep, hidden) -> noise``."""
    from facetron.diffusion.sampler import GenerationRequest, denoise

    sample, hidden = feed["sample"], feed["encoder_hidden_states"]
    factor = source.latent_factor
    req = GenerationRequest(num_images=1, steps=steps, seed=0, height=sample.shape[2] * factor,
                            width=sample.shape[3] * factor)
    return denoise(unet, source.scheduler_config, hidden[1:2], hidden[0:1], req, sample.shape[1], factor)


def runtime_unet(net, feed: dict[str, np.ndarray]):
    """An opened UNet runtime as the sampler's callable, with ``feed``'s LoRA inputs (the same arrays every step)."""
    lora = {k: v for k, v in feed.items() if k.startswith("lora_")}
    return lambda s, t, h: net.run(["noise_pred"], {"sample": s, "timestep": t, "encoder_hidden_states": h,
                                                     **lora})[0]


def torch_bf16_unet(module, inputs, feed: dict[str, np.ndarray]):
    """The torch UNet ``module`` (taking ``inputs``) under ``torch.autocast`` bf16 as the sampler's callable,
    with ``feed``'s LoRA."""
    import torch

    lora = {k: v for k, v in feed.items() if k.startswith("lora_")}
    names = [s.name for s in inputs]

    def call(s, t, h):
        given = {"sample": s, "timestep": t, "encoder_hidden_states": h, **lora}
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return module(*[torch.from_numpy(np.ascontiguousarray(given[n])) for n in names]).float().numpy()
    return call


def release() -> None:
    """Collect what was dropped and hand the freed heap back to the system (before the next big model opens)."""
    import gc

    gc.collect()
    release_heap()


def _open_served(path: Path, cand: tuple[str, str], threads: int, unet: bool):
    """Candidate ``cand`` of net ``path`` opened as served: no fallback, the runtime-LoRA UNet with
    ``reuse_inputs`` and its ONNX Runtime arena kept (``serving/unet.py``), other nets' arena shrunk
    (``triton/batching.py``), no OpenVINO compiled-model cache (the exported graph is a temp file: a cached
    blob would be keyed by a path no server opens)."""
    return open_runtime(path, cand[0], threads, fallback=False, reuse_inputs=unet, precision=cand[1], cache=False,
                        memory=UNET_ORT_MEMORY if unet else DEFAULT_ORT_MEMORY)


def _open(path: Path, cand: tuple[str, str], threads: int, unet: bool, entry: dict):
    """Candidate ``cand`` opened as served, or None (its error goes into ``entry``: not eligible)."""
    t0 = time.perf_counter()
    try:
        net = _open_served(path, cand, threads, unet)
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        entry["runtimes"][label(cand)] = {"eligible": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
        return None
    entry["runtimes"][label(cand)] = {"runtime": cand[0], "precision": cand[1],
                                      "open_s": round(time.perf_counter() - t0, 3)}
    return net


def _measure(net, feed: dict, repeats: int, budget_s: float, reuse: bool) -> tuple[list, float, int]:
    """(first outputs, p50 ms, timed calls) of one open runtime: one warm-up call, then ``repeats`` calls
    (more, up to 20, where ``budget_s`` allows)."""
    t0 = time.perf_counter()
    outputs = net.run(None, feed)  # also the warm-up call
    first = time.perf_counter() - t0
    n = max(repeats, min(20, int(budget_s / max(first, 1e-4))))
    # the LoRA arrays repeat (the same objects, as the bank hands them), the other inputs are new
    # array objects every call, as in a denoising loop
    feeds = [feed, {k: v if (reuse and k.startswith("lora_")) else v.copy() for k, v in feed.items()}]
    samples = []
    for i in range(n):
        t0 = time.perf_counter()
        net.run(None, feeds[i % 2])
        samples.append(time.perf_counter() - t0)
    return outputs, float(np.median(samples) * 1e3), n


def choose_net(source: NetSource, name: str, precision: str = "auto", threads: int | None = None,
               repeats: int = 3, budget_s: float = 0.3) -> dict:
    """One net's report entry: every candidate's speed, deviation and eligibility, and the choice.

    One runtime of the net is open at a time (module docstring): the reference (ONNX Runtime fp32) is
    timed in a block before and after each candidate, and each candidate's speed is its p50 over the
    mean of the reference's p50 in the blocks around it. Torch's bf16 yardstick runs first, its torch
    module loaded for it alone and dropped before any runtime opens."""
    from facetron.export.validate import TOLERANCES, compare

    threads = threads if threads is not None else NetParams().intra_op_threads
    path = source.net_folder(name) / MODEL_FILE
    feed = source.served_feed(name)
    atol, rtol = TOLERANCES["unet_lora" if name == "unet" else name]  # validate's key of the runtime-LoRA UNet
    unet = name == "unet"
    bf16 = bf16_measured(precision)
    others = [FP32_CANDIDATES[1]] + ([BF16_CANDIDATE] if bf16 else [])
    entry: dict = {"shapes": {k: list(v.shape) for k, v in feed.items() if not k.startswith("lora_")},
                   "threads": threads, "runtimes": {}}
    if precision == "auto" and not bf16:
        entry["bf16_skipped"] = BF16_SKIPPED
    latents: dict = {}  # the UNet's image check: the reference's and torch bf16's generations, made once
    # 1. torch's own bf16, the yardstick of a bf16 candidate: the net's torch module alone, freed before any runtime
    if BF16_CANDIDATE in others:
        module, inputs = source.torch_net(name)
        entry["torch_bf16_rel_l2"] = round(torch_bf16_deviation(module, inputs, feed), 6)
        if unet:
            latents["torch_bf16"] = generation_latents(source, feed, torch_bf16_unet(module, inputs, feed))
        module = None
        release()
    # 2. the reference, ONNX Runtime fp32 (without it nothing can be judged): its outputs, generation and first
    #    timing block, then closed
    reference = _open(path, DEFAULT, threads, unet, entry)
    if reference is None:
        raise InvalidInputError(name, f"ONNX Runtime cannot run this net: {entry['runtimes'][label(DEFAULT)]['error']}")
    ref_out, ms, n = _measure(reference, feed, repeats, budget_s, unet)
    ref_ms, calls = [ms], [n]
    if BF16_CANDIDATE in others and unet:
        latents["reference"] = generation_latents(source, feed, runtime_unet(reference, feed))
    reference = None
    release()
    # 3. each other candidate alone: opened, timed, judged, closed; then the reference's next timing block
    ratio = {DEFAULT: 1.0}
    for cand in others:
        net = _open(path, cand, threads, unet, entry)
        if net is None:
            continue
        outputs, ms, n = _measure(net, feed, repeats, budget_s, unet)
        calls.append(n)
        e = entry["runtimes"][label(cand)]
        e["p50_ms"] = round(ms, 3)
        dev = rel_l2(outputs[0], ref_out[0])
        e["rel_l2_vs_onnxruntime"] = round(dev, 6)
        if cand[1] == "f32":
            stats = compare(outputs[0], ref_out[0], atol, rtol)
            e.update({"eligible": bool(stats["pass"]), "max_abs_vs_onnxruntime": stats.get("max_abs"),
                      "atol": atol, "rtol": rtol})
        elif not unet:  # one call per image: the call is what reaches the image
            limit = BF16_FACTOR * entry["torch_bf16_rel_l2"]
            e.update({"eligible": bool(np.isfinite(dev) and dev <= limit), "limit_rel_l2": round(limit, 6)})
        else:  # every step: judged by the final latents of a short generation
            got = generation_latents(source, feed, runtime_unet(net, feed))
            image = {"steps": IMAGE_CHECK_STEPS, "rel_l2": round(rel_l2(got, latents["reference"]), 6),
                     "torch_bf16_rel_l2": round(rel_l2(latents["torch_bf16"], latents["reference"]), 6)}
            limit = BF16_FACTOR * image["torch_bf16_rel_l2"]
            e.update({"per_call_limit_rel_l2": round(BF16_FACTOR * entry["torch_bf16_rel_l2"], 6),
                      "image_check": image, "limit_rel_l2": round(limit, 6),
                      "eligible": bool(np.isfinite(image["rel_l2"]) and image["rel_l2"] <= limit)})
        net = outputs = None  # closed (and its memory handed back) before the reference opens again
        release()
        reference = _open_served(path, DEFAULT, threads, unet)
        _, ms, n = _measure(reference, feed, repeats, budget_s, unet)
        reference = None
        release()
        ref_ms.append(ms)
        calls.append(n)
        around = float(np.mean(ref_ms[-2:]))  # the reference's blocks just before and after it
        ratio[cand] = e["p50_ms"] / around
        e.update({"vs_onnxruntime": round(float(ratio[cand]), 4), "onnxruntime_around_ms": round(around, 3)})
    entry["runtimes"][label(DEFAULT)].update({"p50_ms": round(float(np.median(ref_ms)), 3), "vs_onnxruntime": 1.0,
                                              "eligible": True, "rel_l2_vs_onnxruntime": 0.0,
                                              "blocks_ms": [round(x, 3) for x in ref_ms]})
    entry["repeats"] = min(calls)
    # 4. the choice: ONNX Runtime fp32 unless an eligible candidate is >= (1 - AUTO_MARGIN) faster
    eligible = {c: r for c, r in ratio.items() if entry["runtimes"][label(c)].get("eligible")}
    choice = pick(eligible, DEFAULT)
    entry["choice"], entry["runtime"], entry["precision"] = label(choice), choice[0], choice[1]
    entry["reason"] = "; ".join(
        f"{k} {v['p50_ms']:.2f} ms" + (f" ({v['vs_onnxruntime']:.3f}x onnxruntime's {v['onnxruntime_around_ms']:.2f} ms "
                                       f"around it)" if k != label(DEFAULT) else "")
        + ("" if v.get("eligible") else " (not eligible)") if "p50_ms" in v
        else f"{k}: {v.get('error')}" for k, v in entry["runtimes"].items())
    return entry


def pick(eligible_ms: dict, default):
    """The choice among eligible candidates (their p50 ms, or their time relative to one yardstick):
    ``default`` unless another is at least ``1 - AUTO_MARGIN`` faster, then the fastest; the fastest when
    ``default`` is not eligible."""
    best = min(eligible_ms, key=eligible_ms.get)
    if default in eligible_ms and eligible_ms[best] > AUTO_MARGIN * eligible_ms[default]:
        return default
    return best


def rule_constants(repeats: int, budget_s: float, precision: str = "auto") -> dict:
    """The numbers a measured choice was made by (part of its cache key: another rule measures again), and
    whether a bf16 candidate is measured (``precision`` auto on a CPU with :data:`BF16_FLAGS`)."""
    return {"auto_margin": AUTO_MARGIN, "bf16_factor": BF16_FACTOR, "image_check_steps": IMAGE_CHECK_STEPS,
            "repeats": repeats, "budget_s": budget_s,
            "bf16_candidate": bf16_measured(precision)}


def choose_runtimes(source: NetSource, nets: Iterable[str], precision: str = "auto",
                    threads: int | None = None, repeats: int = 3, budget_s: float = 0.3, *,
                    cache: Path | None = None, reuse: bool = True, rss=None) -> dict:
    """``{net: report entry}`` (:func:`choose_net`) for each of ``nets``, printed as it goes.

    ``cache``: the folder of kept choices (:func:`facetron.export.runtime_choice_cache.cache_root`; None =
    none read or written): a net whose key (this machine, these runtimes, this precision mode, this graph
    architecture) has a kept entry takes it without measuring (its entry says ``reused``: the file), and
    every measured entry is kept there. ``reuse=False`` measures every net again (and keeps the new entries).
    ``rss``: a :class:`facetron.rss_monitor.RssMonitor`; each net is its stage ``choose <net>``."""
    from facetron.export.runtime_choice_cache import choice_key, load_choice, store_choice
    from facetron.rss_monitor import NullMonitor

    check_precision_choice(precision)
    threads = threads if threads is not None else NetParams().intra_op_threads
    rss = rss if rss is not None else NullMonitor()
    cpu = cpu_flags() if cache is not None else None
    report = {}
    for name in nets:
        with rss.stage(f"choose {name}"):
            key = kept = None
            if cache is not None:
                key = choice_key(name, source.net_folder(name) / MODEL_FILE, precision, threads,
                                 rule_constants(repeats, budget_s, precision), cpu)
                kept = load_choice(key, cache) if reuse else None
            if kept is not None:
                entry, file = kept
                report[name] = entry = dict(entry, reused=str(file))
                print(f"[export] runtime of {name}: {entry['choice']} (reused {file}: measured before on this kind of "
                      f"machine for this graph; --remeasure measures again)", flush=True)
                continue
            report[name] = entry = choose_net(source, name, precision, threads, repeats, budget_s)
            if key is not None:  # best effort: a cache that cannot be written costs the next assembly a measurement
                try:
                    entry["kept_as"] = str(store_choice(key, entry, cache))
                except OSError as exc:
                    print(f"[export] the runtime choice of {name} is not kept ({exc})", flush=True)
            print(f"[export] runtime of {name}: {entry['choice']} ({entry['reason']})", flush=True)
    return report


def rule_text(precision: str) -> str:
    text = (f"per net, at the served shapes: the fastest eligible candidate (its p50 over onnxruntime's, timed "
            f"alone in blocks before and after it, one runtime open at a time), onnxruntime unless another is at "
            f"least {round((1 - AUTO_MARGIN) * 100)}% faster; fp32 candidates are eligible "
            f"within the export validation tolerance of onnxruntime's outputs")
    if precision == "auto":
        text += (f"; openvino bf16 is eligible when its rel. L2 deviation from onnxruntime in what reaches the image "
                 f"is at most {BF16_FACTOR:g}x torch's own bf16 (autocast) deviation on the same inputs: the output "
                 f"of the nets that run once per image, the final latents of a {IMAGE_CHECK_STEPS}-step generation "
                 f"for the UNet (measured only where the CPU has {' or '.join(BF16_FLAGS)})")
    return text
