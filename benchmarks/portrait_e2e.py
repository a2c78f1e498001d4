"""One portrait end to end: FaceChain's recipe vs facetron's served runtimes.

One txt2img image (guidance 7: a batch-2 UNet call per step), the same
prompt, negative prompt and seed for every variant, the same initial noise
(:func:`facetron.diffusion.sampler.initial_noise`, image i from seed + i):

* ``facechain``: FaceChain's recipe: diffusers' own ``StableDiffusionPipeline``
  over the torch modules (eager fp32, ``torch.set_num_threads(threads)``),
  ``DPMSolverMultistepScheduler`` with diffusers' default settings over the
  base model's scheduler config (DPM-Solver++ 2M, *not* Karras), 40 steps.
  The face LoRA is merged into the weights (``merge_loras``), as FaceChain
  merges it: nothing per step.
* ``facetron_<runtime>_<precision>``: the served nets opened as the served
  models open them (:func:`facetron.net_runtimes.open_runtime`, the
  served thread count, ``reuse_inputs`` for the UNet): the runtime-LoRA
  text encoder and UNet fed the same face LoRA as graph inputs (what the
  LoRA bank hands them: ``lora_inputs_for`` at ``w_face``), the VAE decoder,
  facetron's tokenizer, ``contract.DEFAULT_STEPS`` steps of
  ``contract.DEFAULT_SCHEDULER`` (DPM-Solver++ 2M Karras), through
  :func:`facetron.pipeline.generation.generate` (the served loop).
  ``onnxruntime_f32`` is the served default at the start of this round;
  ``openvino_bf16`` runs every net with OpenVINO's bf16 precision hint (fast
  only where the CPU has AMX: ``cpu.amx_bf16`` in the result);
  ``openvino_int8w`` compiles every net with int8 weights
  (``nncf.compress_weights``, activations f32: not a served option).
  Unlike a served model, OpenVINO keeps no compiled-model cache here and
  never falls back to ONNX Runtime (a variant that fails is an error row).
* ``facetron_<runtime>_<precision>_fewstep``: the few-step path (issue 23):
  ``contract.FEW_STEP_DEFAULT_STEPS`` (4) LCM steps at
  ``contract.FEW_STEP_DEFAULT_GUIDANCE`` (1: no negative branch, a batch-1
  UNet per step) decoded by the tiny autoencoder (``vae_decoder_tiny``, a
  random ``AutoencoderTiny`` of TAESD's shapes). The served few-step UNet
  (``unet_fewstep``) is the runtime-LoRA UNet graph with the distillation
  LoRA merged into its weights (``export.distill_lora.fewstep_unet``): the
  same graph and cost, so with random weights the ``unet`` graph stands in
  for it. ``..._fewstep_vae`` decodes with the full VAE instead: the
  deviation of the tiny autoencoder is measured against it (random weights:
  two unrelated random decoders, so the number is numerical only).
  ``openvino_int8w_fewstep`` compresses the UNet's weights only (the text
  encoder and the tiny decoder stay f32).
* ``controlnet_step``: the ControlNet's cost per step (template mode's
  ``control``, issue 22) beside the plain step at the guided batch (2), in
  ONNX Runtime fp32: the plain runtime-LoRA ``unet`` call vs ``controlnet``
  + the UNet's control graph (``unet/control/``, taking the residuals), each
  graph from a random ``ControlNetModel`` of the UNet's blocks, interleaved
  calls after one warm-up, medians.

Measured per variant, once, after one warm-up generation at 2 steps (which
also compiles OpenVINO's static graphs): seconds for the whole image and per
stage (text encoder, UNet total and per step, VAE decoder; ``other_s`` is
the rest: tokenizer, scheduler, glue), ``open_s`` (opening the nets) and
``warmup_s``; the speed-up over ``facechain`` (facechain_s / variant_s).

Deviation is **numerical only** (random weights: the pictures mean nothing):
each facetron variant vs ``facetron_onnxruntime_f32`` at the same steps
(runtime / precision deviation) and ``facetron_onnxruntime_f32`` vs
``facechain`` (steps + scheduler: 25 DPM++ 2M Karras vs 40 DPM-Solver++
multistep): PSNR (dB) and max abs (levels) of the uint8 images, relative L2
of the final latents. At the *same* scheduler and steps facetron reproduces
diffusers' pipeline within 2/255 (tests/test_diffusers_parity.py).

``spec`` "tiny" (default, seconds) or "sd15" (``full``: SD-1.5 shapes,
512x512, random weights; ~15 GB and the machine alone, ~20 minutes on 2
cores). The graphs are exported once into a temporary folder before any
timing; one variant's nets are open at a time.
"""

from __future__ import annotations

import gc
import math
import resource
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from facetron import contract
from facetron.benchmarks.facechain_recipe import FACECHAIN_STEPS, facechain_pipeline, run_facechain, run_torch_bf16
from facetron.benchmarks.portrait_setup import NEGATIVE, PROMPT, SEED, WARMUP_STEPS, Setup, StageClock, prepare
from facetron.errors import InvalidInputError

FACECHAIN = "facechain"
#: the oracle of bf16 error: diffusers' pipeline under torch.autocast(bf16), facetron's scheduler and steps
TORCH_BF16 = "diffusers_torch_bf16"
REFERENCE = "facetron_onnxruntime_f32"
STAGES = ("text_encode_s", "unet_s", "vae_decode_s", "other_s")
NOTE = ("random weights: the pictures mean nothing; the deviations are numerical only (how far the runtimes, "
        "precisions and the steps + scheduler move the same computation)")


@dataclass(frozen=True)
class Runtime:
    """How a facetron variant runs every net."""

    runtime: str  # contract.NET_RUNTIMES
    precision: str = "f32"  # contract.NET_PRECISIONS (OpenVINO)
    int8_weights: bool = False  # OpenVINO: nncf.compress_weights (not a served option)
    cache_interval: int = 1  # step caching (DeepCache): a full UNet every N steps, the shallow graph between
    few_step: bool = False  # LCM, FEW_STEP_DEFAULT_STEPS steps at FEW_STEP_DEFAULT_GUIDANCE (a batch-1 UNet per step)
    tiny_vae: bool = False  # decode with vae_decoder_tiny (AutoencoderTiny, TAESD's shapes)

    @property
    def steps(self) -> int:
        return contract.FEW_STEP_DEFAULT_STEPS if self.few_step else contract.DEFAULT_STEPS


FACETRON_VARIANTS: dict[str, Runtime] = {
    "facetron_onnxruntime_f32": Runtime("onnxruntime"),
    "facetron_openvino_f32": Runtime("openvino"),
    "facetron_openvino_bf16": Runtime("openvino", "bf16"),
    "facetron_openvino_bf16_cache2": Runtime("openvino", "bf16", cache_interval=2),
    "facetron_openvino_bf16_cache3": Runtime("openvino", "bf16", cache_interval=3),
    "facetron_openvino_int8w": Runtime("openvino", int8_weights=True),
    "facetron_onnxruntime_f32_fewstep_vae": Runtime("onnxruntime", few_step=True),
    "facetron_onnxruntime_f32_fewstep": Runtime("onnxruntime", few_step=True, tiny_vae=True),
    "facetron_openvino_f32_fewstep": Runtime("openvino", few_step=True, tiny_vae=True),
    "facetron_openvino_bf16_fewstep": Runtime("openvino", "bf16", few_step=True, tiny_vae=True),
    "facetron_openvino_int8w_fewstep": Runtime("openvino", int8_weights=True, few_step=True, tiny_vae=True),
}
#: the few-step variants' reference (runtime / precision deviation at the same steps and decoder)
FEWSTEP_REFERENCE = "facetron_onnxruntime_f32_fewstep"
#: the ControlNet's cost per step beside the plain step (not an image: its own section of the result)
CONTROL_STEP = "controlnet_step"
VARIANTS = (FACECHAIN, TORCH_BF16, *FACETRON_VARIANTS, CONTROL_STEP)


def psnr(got: np.ndarray, ref: np.ndarray) -> float | None:
    """PSNR in dB of two uint8 images, rounded; None where they are identical (infinite, not JSON)."""
    from facetron.deviation import psnr_uint8

    db = psnr_uint8(got, ref)
    return None if math.isinf(db) else round(db, 2)


def psnr_text(db: float | None) -> str:
    return "identical" if db is None else f"{db} dB"


def image_deviation(got: dict, ref: dict) -> dict:
    """uint8 image PSNR / max abs / mean abs and final-latent deviation (``runtimes.deviation``) of two runs."""
    from facetron.benchmarks.runtimes import deviation

    diff = np.abs(got["image"].astype(np.int16) - ref["image"].astype(np.int16))
    latents = deviation(got["latents"], ref["latents"])
    return {"psnr_db": psnr(got["image"], ref["image"]), "max_abs": int(diff.max()),
            "mean_abs": round(float(diff.mean()), 4), "latents_rel_l2": latents.get("rel_l2"),
            "latents_max_abs": latents.get("max_abs")}


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (GiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


# ----------------------------------------------------------------------------- facetron: the served nets and loop


def open_net(path: Path, how: Runtime, threads: int, *, reuse_inputs: bool = False, int8: bool | None = None):
    """One served net in ``how``'s runtime (``open_runtime`` as the served models call it, no compiled-model
    cache, no fallback; int8 weights (``int8``, default ``how.int8_weights``): the served OpenVINO runtime over
    ``nncf.compress_weights``' model)."""
    from facetron.net_runtimes import STATIC_SHAPE_GRAPHS, OpenVinoRuntime, open_runtime, openvino_model

    if not (how.int8_weights if int8 is None else int8):
        return open_runtime(path, how.runtime, threads, cache=False, fallback=False, reuse_inputs=reuse_inputs,
                            precision=how.precision)
    import nncf

    return OpenVinoRuntime(path, threads, model=nncf.compress_weights(openvino_model(path)), precision=how.precision,
                           static_shapes=STATIC_SHAPE_GRAPHS, reuse_inputs=reuse_inputs)


def facetron_nets(setup: Setup, how: Runtime, threads: int):
    """(DiffusionNets over the opened runtimes, the runtimes by net): the LoRA inputs the bank would hand over."""
    from facetron.diffusion.clip_tokenizer import ClipTokenizer
    from facetron.diffusion.nets import DiffusionNets

    int8_others = how.int8_weights and not how.few_step  # the few-step path: int8 weights on the UNet only
    te = open_net(setup.graph("text_encoder"), how, threads, int8=int8_others)
    unet = open_net(setup.graph("unet"), how, threads, reuse_inputs=True)  # as the served unet model opens it
    vae = open_net(setup.graph("vae_decoder_tiny" if how.tiny_vae else "vae_decoder"), how, threads, int8=int8_others)
    opened = {"text_encoder": te, "unet": unet, "vae_decoder": vae}
    if how.cache_interval > 1:  # the step cache's shallow graph, as the unet model opens it on first use
        opened["unet_shallow"] = open_net(setup.shallow_graph(), how, threads, reuse_inputs=True)
    shallow_inputs = {i.name for i in opened["unet_shallow"].get_inputs()} if "unet_shallow" in opened else set()

    def feed(sample, t, hidden, lora, **more) -> dict:
        return {"sample": sample, "timestep": t, "encoder_hidden_states": hidden, **more, **lora}

    nets = DiffusionNets(
        tokenize=ClipTokenizer(),
        text_encode=lambda ids: te.run(["last_hidden_state"], {"input_ids": ids, **setup.te_lora})[0],
        unet=lambda sample, t, hidden, **lora: unet.run(["noise_pred"], feed(sample, t, hidden, lora))[0],
        unet_deep=lambda sample, t, hidden, **lora: tuple(unet.run([
            "noise_pred", contract.DEEP_FEATURE], feed(sample, t, hidden, lora))),
        unet_shallow=lambda sample, t, hidden, f, **lora: opened["unet_shallow"].run(["noise_pred"], {
            k: v for k, v in feed(sample, t, hidden, lora, deep_feature=f).items() if k in shallow_inputs})[0],
        vae_decode=lambda latent: vae.run(["images"], {"latent": latent})[0],
        latent_channels=setup.latent_channels, latent_factor=setup.latent_factor)
    return nets, opened


def facetron_image(nets, setup: Setup, steps: int, cache_interval: int = 1, few_step: bool = False) -> dict:
    """One image through ``generate`` (the served loop): uint8 image, final latents (what the VAE decoder
    was given), stage times. ``few_step``: LCM at guidance 1, the batch-1 LoRA inputs."""
    from facetron.pipeline.generation import generate

    clock, final = StageClock(), {}
    decode = clock.wrap("vae_decode", nets.vae_decode)

    def keep_latents(latent):
        final["latents"] = latent
        return decode(latent)

    timed = replace(nets, text_encode=clock.wrap("text_encode", nets.text_encode), unet=clock.wrap("unet", nets.unet),
                    unet_deep=clock.wrap("unet", nets.unet_deep), unet_shallow=clock.wrap("unet", nets.unet_shallow),
                    vae_decode=keep_latents)
    t0 = time.perf_counter()
    image = generate(timed, setup.scheduler_config, PROMPT, NEGATIVE, setup.request(steps, cache_interval, few_step),
                     unet_extra=setup.unet_lora_single if few_step else setup.unet_lora)
    total = time.perf_counter() - t0
    return {"image": image, "latents": final["latents"], "stages": clock.stages(total, steps)}


def run_facetron(setup: Setup, variant: str, threads: int) -> tuple[dict, dict | None]:
    """(result entry, outputs) of one facetron variant: open, warm up at 2 steps, one image, drop the nets."""
    how = FACETRON_VARIANTS[variant]
    entry = {"kind": "facetron generate (served loop), served nets", "runtime": how.runtime,
             "precision": how.precision, "int8_weights": how.int8_weights, "cache_interval": how.cache_interval,
             "steps": how.steps,
             "scheduler": "lcm (LCMScheduler)" if how.few_step else
                          f"{contract.DEFAULT_SCHEDULER} (DPM-Solver++ 2M, Karras sigmas)",
             "guidance": contract.FEW_STEP_DEFAULT_GUIDANCE if how.few_step else contract.DEFAULT_GUIDANCE,
             "vae": "vae_decoder_tiny (AutoencoderTiny, TAESD shapes)" if how.tiny_vae else "vae_decoder",
             "lora": "runtime-LoRA graph inputs (text encoder + UNet)"}
    nets = opened = None
    try:
        t0 = time.perf_counter()
        nets, opened = facetron_nets(setup, how, threads)
        entry["open_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        facetron_image(nets, setup, WARMUP_STEPS, how.cache_interval, how.few_step)  # OpenVINO compiles here
        entry["warmup_s"] = round(time.perf_counter() - t0, 2)
        out = facetron_image(nets, setup, how.steps, how.cache_interval, how.few_step)
        entry["runtimes_used"] = {name: net.runtime for name, net in opened.items()}
        entry["stages"] = out["stages"]
        return entry, out
    except Exception as exc:  # noqa: BLE001 - one variant failing is a result, not a crash
        entry["error"] = f"{type(exc).__name__}: {exc}"[:400]
        return entry, None
    finally:
        del nets, opened
        gc.collect()


def control_step(setup: Setup, threads: int, repeats: int = 2, runtime: str = "onnxruntime") -> dict:
    """The ControlNet's cost per step beside the plain step, at the guided batch (2): the runtime-LoRA ``unet``
    call vs ``controlnet`` + the UNet's control graph, as the generator runs them (``_controlled_fn``), the same
    sample / timestep / text / LoRA, a random conditioning image at scale 1; one warm-up each, then ``repeats``
    interleaved rounds, medians (s)."""
    from facetron.diffusion.sampler import initial_noise

    how = Runtime(runtime)
    entry: dict = {"runtime": runtime, "precision": how.precision, "batch": 2, "repeats": repeats,
                   "what": "plain: the unet graph; controlled: the controlnet graph + unet/control/ (its residuals "
                           "in), one step of template mode's control at guidance > 1"}
    nets = {}
    try:
        size = setup.resolution // setup.latent_factor
        sample = np.repeat(initial_noise(setup.seed, 1, (setup.latent_channels, size, size)).numpy(), 2, axis=0)
        t = np.full(2, 500.0, np.float32)
        hidden = np.random.default_rng(setup.seed).standard_normal((2, 77, 768), np.float32)
        cond = np.random.default_rng(setup.seed + 1).random((2, 3, setup.resolution, setup.resolution), np.float32)
        base = {"sample": sample, "timestep": t, "encoder_hidden_states": hidden}
        t0 = time.perf_counter()
        nets = {"unet": open_net(setup.graph("unet"), how, threads, reuse_inputs=True),
                "controlnet": open_net(setup.graph("controlnet"), how, threads),
                "unet_control": open_net(setup.control_graph(), how, threads, reuse_inputs=True)}
        entry["open_s"] = round(time.perf_counter() - t0, 2)
        hidden_width = {i.name: i.shape for i in nets["unet"].get_inputs()}["encoder_hidden_states"][-1]
        if isinstance(hidden_width, int) and hidden_width != hidden.shape[-1]:
            base["encoder_hidden_states"] = hidden = np.random.default_rng(setup.seed).standard_normal(
                (2, 77, hidden_width), np.float32)
        residual_names = nets["controlnet"].output_names()

        def plain():
            return nets["unet"].run(["noise_pred"], {**base, **setup.unet_lora})[0]

        def controlled():
            t1 = time.perf_counter()
            residuals = nets["controlnet"].run(residual_names, {**base, "controlnet_cond": cond,
                                                                "conditioning_scale": np.ones(2, np.float32)})
            t2 = time.perf_counter()
            nets["unet_control"].run(["noise_pred"], {**base, **dict(zip(residual_names, residuals)),
                                                      **setup.unet_lora})
            return t2 - t1, time.perf_counter() - t2

        plain(), controlled()  # warm-up (OpenVINO would compile here)
        times: dict[str, list[float]] = {"plain_s": [], "controlnet_s": [], "unet_control_s": []}
        for _ in range(repeats):
            t0 = time.perf_counter()
            plain()
            times["plain_s"].append(time.perf_counter() - t0)
            cn, uc = controlled()
            times["controlnet_s"].append(cn)
            times["unet_control_s"].append(uc)
        med = {k: round(float(np.median(v)), 3) for k, v in times.items()}
        med["controlled_step_s"] = round(med["controlnet_s"] + med["unet_control_s"], 3)
        med["controlled_over_plain"] = round(med["controlled_step_s"] / med["plain_s"], 3)
        entry.update(med, samples={k: [round(x, 3) for x in v] for k, v in times.items()})
    except Exception as exc:  # noqa: BLE001 - a failure is a result row
        entry["error"] = f"{type(exc).__name__}: {exc}"[:400]
    finally:
        nets.clear()
        gc.collect()
    return entry


# ----------------------------------------------------------------------------- the benchmark


def check_variants(variants: Sequence[str]) -> tuple[str, ...]:
    variants = tuple(dict.fromkeys(variants))
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise InvalidInputError("--variants", f"expected some of {', '.join(VARIANTS)}, "
                                              f"got {', '.join(unknown) or 'none'}")
    return variants


def deviations(outputs: dict[str, dict]) -> list[dict]:
    """Each facetron variant vs ``facetron_onnxruntime_f32`` (same steps; few-step ones vs
    :data:`FEWSTEP_REFERENCE`), the tiny autoencoder vs the full VAE at the same few steps, and the
    reference vs ``facechain``."""
    rows = []
    ref = outputs.get(REFERENCE)
    fewstep = {v for v in outputs if v in FACETRON_VARIANTS and FACETRON_VARIANTS[v].few_step}
    for variant in sorted(fewstep - {FEWSTEP_REFERENCE}):
        how = FACETRON_VARIANTS[variant]
        if how.tiny_vae and FEWSTEP_REFERENCE in outputs:
            rows.append({"variant": variant, "vs": FEWSTEP_REFERENCE,
                         "what": "runtime / precision, the same few steps and tiny decoder",
                         **image_deviation(outputs[variant], outputs[FEWSTEP_REFERENCE])})
    if FEWSTEP_REFERENCE in outputs and "facetron_onnxruntime_f32_fewstep_vae" in outputs:
        rows.append({"variant": FEWSTEP_REFERENCE, "vs": "facetron_onnxruntime_f32_fewstep_vae",
                     "what": "tiny autoencoder vs full VAE, the same latents (random weights: two unrelated "
                             "random decoders, numerical only)",
                     **image_deviation(outputs[FEWSTEP_REFERENCE], outputs["facetron_onnxruntime_f32_fewstep_vae"])})
    for variant, out in outputs.items():
        if ref is not None and variant not in (REFERENCE, FACECHAIN) and variant not in fewstep:
            what = ("torch's own bf16 (autocast), diffusers' pipeline: the yardstick of bf16 error"
                    if variant == TORCH_BF16 else "runtime / precision, same steps and scheduler")
            rows.append({"variant": variant, "vs": REFERENCE, "what": what,
                         **image_deviation(out, ref)})
    for variant, out in outputs.items():  # step caching alone: vs the same runtime without it
        how = FACETRON_VARIANTS.get(variant)
        twin = next((v for v, h in FACETRON_VARIANTS.items() if how is not None and how.cache_interval > 1
                     and h == replace(how, cache_interval=1)), None)
        if twin in outputs:
            rows.append({"variant": variant, "vs": twin, "what": f"step caching alone (interval {how.cache_interval})",
                         **image_deviation(out, outputs[twin])})
    if ref is not None and FACECHAIN in outputs:
        rows.append({"variant": REFERENCE, "vs": FACECHAIN,
                     "what": f"steps + scheduler: {contract.DEFAULT_STEPS} DPM-Solver++ 2M Karras vs "
                             f"{FACECHAIN_STEPS} DPM-Solver++ multistep, same noise and LoRA",
                     **image_deviation(ref, outputs[FACECHAIN])})
    return rows


def speedups(entries: dict[str, dict]) -> None:
    """``speedup_over_facechain`` = facechain's total seconds / the variant's, in place."""
    base = entries.get(FACECHAIN, {}).get("stages", {}).get("total_s")
    for entry in entries.values():
        total = entry.get("stages", {}).get("total_s")
        entry["speedup_over_facechain"] = round(base / total, 3) if base and total else None


def run(full: bool = False, variants: Sequence[str] = VARIANTS, threads: int = 2, out_dir: Path | None = None,
        work_dir: Path | None = None, seed: int = SEED, write: bool = True) -> dict:
    """The benchmark: tiny (default) or SD-1.5 shapes (``full``); writes JSON + MD + PNG (``write``)."""
    from facetron.benchmarks.runtimes import _loadavg, _versions, cpu_description

    variants = check_variants(variants)
    spec = "sd15" if full else "tiny"
    cpu = cpu_description()
    result: dict = {"spec": spec, "note": NOTE, "cpu": {**cpu, "amx_bf16": "amx_bf16" in cpu["flags"]},
                    "threads": threads, "versions": _versions(), "variants_asked": list(variants),
                    "prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": seed,
                    "guidance": contract.DEFAULT_GUIDANCE, "loadavg_start": _loadavg(), "variants": {},
                    "peak_rss_gib": {}}
    entries, outputs = result["variants"], {}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="facetron-bench-portrait-") as tmp:
        # 1. the nets (random weights), the face LoRA and the served graphs, exported once before any timing
        print(f"[bench portrait] {spec}: building the nets, the face LoRA and exporting the graphs ...", flush=True)
        t0 = time.perf_counter()
        wanted = [FACETRON_VARIANTS[v] for v in variants if v in FACETRON_VARIANTS]
        base, setup = prepare(spec, Path(tmp), seed, tiny_vae=any(h.tiny_vae for h in wanted),
                              controlnet=CONTROL_STEP in variants)
        result["resolution"], result["prepare_s"] = setup.resolution, round(time.perf_counter() - t0, 1)
        result["peak_rss_gib"]["prepare"] = peak_rss_gib()
        # 2. FaceChain's recipe in torch, then the torch modules go (the graphs are written)
        pipe = facechain_pipeline(base, setup) if {FACECHAIN, TORCH_BF16} & set(variants) else None
        if FACECHAIN in variants:
            print(f"[bench portrait] {FACECHAIN}: diffusers + torch eager, {FACECHAIN_STEPS} steps ...", flush=True)
            entries[FACECHAIN], outputs[FACECHAIN] = run_facechain(pipe, setup, threads)
            result["peak_rss_gib"][FACECHAIN] = peak_rss_gib()
        if TORCH_BF16 in variants:
            print(f"[bench portrait] {TORCH_BF16}: diffusers + torch.autocast bf16, {contract.DEFAULT_STEPS} steps ...",
                  flush=True)
            entries[TORCH_BF16], outputs[TORCH_BF16] = run_torch_bf16(pipe, setup, threads)
        del base, pipe
        gc.collect()
        # 3. facetron's variants, one variant's nets open at a time
        for variant in (v for v in variants if v in FACETRON_VARIANTS):
            print(f"[bench portrait] {variant}: {FACETRON_VARIANTS[variant].steps} steps ...", flush=True)
            entries[variant], out = run_facetron(setup, variant, threads)
            if out is not None:
                outputs[variant] = out
            result["peak_rss_gib"][variant] = peak_rss_gib()
            if "error" in entries[variant]:
                print(f"[bench portrait] {variant} failed: {entries[variant]['error']}", flush=True)
        if CONTROL_STEP in variants:
            print(f"[bench portrait] {CONTROL_STEP}: the ControlNet's cost per step beside the plain step ...",
                  flush=True)
            result[CONTROL_STEP] = control_step(setup, threads)
            result["peak_rss_gib"][CONTROL_STEP] = peak_rss_gib()
            if "error" in result[CONTROL_STEP]:
                print(f"[bench portrait] {CONTROL_STEP} failed: {result[CONTROL_STEP]['error']}", flush=True)
    # 4. speed-ups and deviations
    speedups(entries)
    result["deviations"] = deviations(outputs)
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    result["loadavg_end"] = _loadavg()
    for variant, entry in entries.items():
        s = entry.get("stages")
        if s:
            print(f"[bench portrait] {variant}: {s['total_s']} s (x{entry['speedup_over_facechain']} over facechain)",
                  flush=True)
    # 5. JSON + MD + PNG
    if write:
        result["files"] = write_files(result, out_dir)
    return result


# ----------------------------------------------------------------------------- report


def _cell(v, fmt: str = "{:.3g}") -> str:
    return "" if v is None else fmt.format(v)


def markdown(result: dict) -> str:
    from facetron.benchmarks.report import markdown_table

    dev: dict[str, dict] = {}
    for d in result["deviations"]:  # each variant's first row: vs its reference (the 25-step or few-step one)
        if d["vs"] in (REFERENCE, FEWSTEP_REFERENCE):
            dev.setdefault(d["variant"], d)
    rows = []
    for variant, e in result["variants"].items():
        s, d = e.get("stages", {}), dev.get(variant, {})
        rows.append({"variant": variant, "steps": e["steps"], "total s": s.get("total_s", ""),
                     "text encode s": s.get("text_encode_s", ""), "UNet s": s.get("unet_s", ""),
                     "UNet s/step": s.get("unet_s_per_step", ""), "VAE decode s": s.get("vae_decode_s", ""),
                     "other s": s.get("other_s", ""), "x facechain": _cell(e.get("speedup_over_facechain")),
                     "open s": e.get("open_s", ""), "warm-up s": e.get("warmup_s", ""),
                     "guidance": e.get("guidance", result["guidance"]), "VAE": e.get("vae", "").split(" ")[0],
                     "vs": d.get("vs", ""), "PSNR": psnr_text(d["psnr_db"]) if d else "",
                     "max abs (levels)": d.get("max_abs", ""), "latents rel L2": _cell(d.get("latents_rel_l2")),
                     "error": e.get("error", "")})
    cols = list(rows[0]) if rows else []
    devs = "".join(f"- {d['variant']} vs {d['vs']} ({d['what']}): PSNR {psnr_text(d['psnr_db'])}, "
                   f"max abs {d['max_abs']} levels, mean abs {d['mean_abs']}, "
                   f"latents rel L2 {_cell(d['latents_rel_l2'])}\n"
                   for d in result["deviations"])
    cpu, control = result["cpu"], result.get(CONTROL_STEP)
    control_text = "" if not control else (
        f"\nControlNet cost per step ({control['runtime']} {control['precision']}, batch {control['batch']}, "
        f"median of {control['repeats']}): " + (f"failed: {control['error']}" if "error" in control else
        f"plain UNet {control['plain_s']} s; ControlNet {control['controlnet_s']} s + UNet with residuals "
        f"{control['unet_control_s']} s = {control['controlled_step_s']} s per step "
        f"(x{control['controlled_over_plain']} the plain step)") + "\n")
    return (f"One {result['resolution']}x{result['resolution']} txt2img portrait, guidance {result['guidance']} "
            f"(batch-2 UNet per step; few-step variants: LCM, guidance {contract.FEW_STEP_DEFAULT_GUIDANCE}, a "
            f"batch-1 UNet per step), spec `{result['spec']}`. **{result['note']}.**\n\n"
            f"CPU: {cpu['model']}; kernel flags: {', '.join(cpu['kernel_flags']) or 'none'} (amx_bf16: "
            f"{cpu['amx_bf16']}); {result['threads']} threads per runtime (torch: set_num_threads). Each variant: "
            f"one image after a 2-step warm-up; x facechain = facechain total s / variant total s.\n\n"
            + markdown_table(rows, cols) + control_text + "\nDeviations (uint8 image, final latents):\n\n" + devs
            + f"\nwall time {result['wall_s']} s (prepare {result['prepare_s']} s); peak RSS GiB after each phase "
              f"{result['peak_rss_gib']}; load average {result['loadavg_start']} -> {result['loadavg_end']}\n")


def write_files(result: dict, out_dir: Path | None = None) -> list[str]:
    from facetron.benchmarks.report import write_result

    json_path = write_result(f"portrait-{result['spec']}", result, markdown(result), out_dir=out_dir)
    files = [str(json_path), str(json_path.with_suffix(".md"))]
    png = plot(result, json_path.with_suffix(".png"))
    return files + ([str(png)] if png else [])


def plot(result: dict, path: Path) -> Path | None:
    """Horizontal stacked bars: seconds per variant by stage, the speed-up over facechain at the end."""
    from facetron.benchmarks.machine import machine_info
    from facetron.benchmarks.plots import _plt, _save, footer_text

    done = [(v, e) for v, e in result["variants"].items() if e.get("stages")]
    if not done:
        return None
    fig, ax = _plt().subplots(figsize=(9.0, 0.55 * len(done) + 1.8))
    left = [0.0] * len(done)
    for stage, color in zip(STAGES, ("#e94", "#2a7", "#36c", "#999")):
        vals = [max(0.0, e["stages"][stage]) for _, e in done]
        ax.barh(range(len(done)), vals, left=left, color=color, label=stage[:-2].replace("_", " "))
        left = [a + b for a, b in zip(left, vals)]
    for y, (_, e) in enumerate(done):
        x = e.get("speedup_over_facechain")
        ax.text(left[y], y, f" {e['stages']['total_s']:.3g} s" + (f"  x{x:.2f}" if x else ""), va="center", fontsize=8)
    ax.set_yticks(range(len(done)), [f"{v} ({e['steps']} steps)" for v, e in done], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(left) * 1.25)
    ax.set_xlabel("seconds for one image (x: speed-up over facechain)")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"One portrait end to end ({result['spec']}, {result['resolution']} px, random weights)", fontsize=10)
    return _save(fig, path, footer_text(machine_info()) + f" | openvino {result['versions'].get('openvino')}")
