"""FaceChain's recipe, the yardstick of ``facetron bench portrait``: diffusers' own
``StableDiffusionPipeline`` over the torch modules (eager fp32), the face LoRA merged into the weights,
``DPMSolverMultistepScheduler`` with diffusers' defaults, 40 steps; and the same pipeline under
``torch.autocast`` bf16 (the oracle of bf16 error)."""

from __future__ import annotations

import time

import numpy as np

from facetron import contract
from facetron.benchmarks.portrait_setup import NEGATIVE, PROMPT, WARMUP_STEPS, Setup, StageClock

FACECHAIN_STEPS = 40  # FaceChain's inference steps (DPM-Solver multistep, default settings)


def facechain_pipeline(base, setup: Setup):
    """diffusers' ``StableDiffusionPipeline`` over ``base``'s modules, the LoRA merged in place (as FaceChain
    merges it), a CLIPTokenizer from facetron's vocabulary files, no safety checker."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from facetron.diffusion.clip_tokenizer import write_tokenizer_files
    from facetron.export.merge import merge_loras

    unet, text_encoder = merge_loras(base, setup.lora_path, w_face=contract.UnetParams().w_face, inplace=True)
    tokenizer = CLIPTokenizer.from_pretrained(str(write_tokenizer_files(setup.work / "tokenizer")))
    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=facechain_scheduler(setup), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def facechain_scheduler(setup: Setup):
    """FaceChain's: ``DPMSolverMultistepScheduler.from_config(<base scheduler config>)``, diffusers' defaults."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(setup.scheduler_config)


def facechain_image(pipe, setup: Setup, steps: int, scheduler=None) -> dict:
    """One image through diffusers' pipeline: uint8 image, final latents, stage times (``scheduler``:
    another diffusers scheduler than FaceChain's, e.g. facetron's to check both compute the same)."""
    import torch

    from facetron.diffusion.sampler import initial_noise

    pipe.scheduler = scheduler or facechain_scheduler(setup)
    h = setup.resolution // setup.latent_factor
    # the same noise as facetron's loop; the pipeline multiplies it by init_noise_sigma, as facetron's does
    noise = initial_noise(setup.seed, 1, (setup.latent_channels, h, h))
    clock, final = StageClock(), {}
    handles = (clock.hook("text_encode", pipe.text_encoder) + clock.hook("unet", pipe.unet)
               + clock.hook("vae_decode", pipe.vae.decoder))

    def keep_latents(_pipe, _i, _t, kwargs):
        final["latents"] = kwargs["latents"]
        return kwargs

    try:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = pipe(PROMPT, negative_prompt=NEGATIVE, height=setup.resolution, width=setup.resolution,
                       num_inference_steps=steps, guidance_scale=contract.DEFAULT_GUIDANCE, latents=noise,
                       output_type="np", callback_on_step_end=keep_latents,
                       callback_on_step_end_tensor_inputs=["latents"]).images
        total = time.perf_counter() - t0
    finally:
        for handle in handles:
            handle.remove()
    image = (out * 255).round().astype(np.uint8)  # as the parity test rounds diffusers' float output
    return {"image": image, "latents": final["latents"].float().numpy(), "stages": clock.stages(total, steps)}


def run_facechain(pipe, setup: Setup, threads: int) -> tuple[dict, dict]:
    """(result entry, outputs) of the ``facechain`` variant: warm-up at 2 steps, then one image at 40."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        facechain_image(pipe, setup, WARMUP_STEPS)
        warmup_s = time.perf_counter() - t0
        out = facechain_image(pipe, setup, FACECHAIN_STEPS)
    finally:
        torch.set_num_threads(old)
    entry = {"kind": "diffusers StableDiffusionPipeline, torch eager fp32", "runtime": "torch", "precision": "f32",
             "steps": FACECHAIN_STEPS, "scheduler": "DPMSolverMultistepScheduler, diffusers defaults "
             "(DPM-Solver++ 2M, no Karras sigmas)", "lora": "merged into the weights",
             "warmup_s": round(warmup_s, 2), "stages": out["stages"]}
    return entry, out


def run_torch_bf16(pipe, setup: Setup, threads: int) -> tuple[dict, dict]:
    """(result entry, outputs) of :data:`TORCH_BF16`: the same pipeline under ``torch.autocast`` bf16 with
    facetron's scheduler and steps, so its deviation from ``facetron_onnxruntime_f32`` is the error bf16
    arithmetic itself brings to a whole image (the yardstick for facetron's bf16 variants)."""
    import torch

    from facetron.diffusion.sampler import make_scheduler

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        scheduler = make_scheduler(contract.DEFAULT_SCHEDULER, setup.scheduler_config)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            t0 = time.perf_counter()
            facechain_image(pipe, setup, WARMUP_STEPS, scheduler)
            warmup_s = time.perf_counter() - t0
            out = facechain_image(pipe, setup, contract.DEFAULT_STEPS,
                                  make_scheduler(contract.DEFAULT_SCHEDULER, setup.scheduler_config))
    finally:
        torch.set_num_threads(old)
    out["latents"] = np.asarray(out["latents"], np.float32)
    entry = {"kind": "diffusers StableDiffusionPipeline, torch.autocast(cpu, bfloat16)", "runtime": "torch",
             "precision": "bf16 (autocast)", "steps": contract.DEFAULT_STEPS,
             "scheduler": f"{contract.DEFAULT_SCHEDULER} (facetron's)", "lora": "merged into the weights",
             "warmup_s": round(warmup_s, 2), "stages": out["stages"]}
    return entry, out
