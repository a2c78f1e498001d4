"""facetron computes what diffusers computes: the oracle is diffusers' own
``StableDiffusionPipeline`` / ``StableDiffusionImg2ImgPipeline`` (and peft's
LoRA layers under ``load_lora_weights`` + ``set_adapters``) on the tiny
default model, never facetron's own sampler or merge.

facetron's side runs the served code path in-process: the exported ONNX nets
in ONNX Runtime (text encoder, runtime-LoRA UNet, VAE decoder / encoder),
facetron's tokenizer, :func:`facetron.pipeline.generation.generate` (and, for
template mode before the face-region paste, :func:`facetron.diffusion.
sampler.denoise` + the VAE decoder); and once through the served Triton
models. Same scheduler config, seeds (image i: ``seed + i``), steps, guidance.
diffusers gets the seeds as ``generator=[torch.Generator().manual_seed(seed + i)
...]``: it draws the initial noise from them and, for the few-step schedulers
(``lcm``, ``tcd``: fresh noise between steps), every step's noise after it.

Tolerances (per pixel, uint8 levels):
* max abs <= ``PIXEL_TOL`` = 2 for 4-10 steps: both sides round the decoded
  image to uint8 the same way (``round(clamp(x/2+0.5) * 255)``), so a float
  difference of ~1e-5 (ONNX Runtime vs torch fp32 kernels; (W+BA)x vs
  Wx+B(Ax) for LoRAs) flips a value sitting on a .5 boundary by one level;
  one more level is margin for other CPUs' kernels. Measured: 1 everywhere.
* mean abs <= ``MEAN_TOL`` = 0.01: nearly every pixel is identical
  (measured 0.0001).
A one-step difference in template mode (the old ``round`` start step) or a
missing LoRA gives differences of tens of levels (asserted too). The LoRAs
change the picture by ~13 levels on average; much stronger ones (B ~ N(0,
0.3²)) saturate the random tiny model and make a few steps chaotic, where
torch-vs-torch already differs by 15 levels.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, LCMScheduler,
                       StableDiffusionImg2ImgPipeline, StableDiffusionPipeline, TCDScheduler)

from facetron import contract
from facetron.diffusion.base_model import load_base_model
from facetron.diffusion.clip_tokenizer import ClipTokenizer
from facetron.diffusion.lora_inputs import lora_inputs_for, read_lora_manifest, zero_lora_inputs
from facetron.diffusion.nets import DiffusionNets
from facetron.diffusion.sampler import SCHEDULER_SETTINGS, GenerationRequest, denoise, start_step
from facetron.errors import InvalidInputError
from facetron.export.merge import merge_loras
from facetron.export.onnx_export import export_onnx, graph_module
from facetron.export.onnx_graph import ModelDims
from facetron.export.runtime_lora import export_runtime_lora_text_encoder
from facetron.pipeline.generation import generate
from facetron.training.random_lora import write_random_lora
from user_tokens import grant  # noqa: E402

SCHEDULERS = {"dpmsolver": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler, "ddim": DDIMScheduler,
              "lcm": LCMScheduler, "tcd": TCDScheduler}
CLASSIC = ("dpmsolver", "euler", "ddim")  # the LoRA tests' schedulers (LoRA parity does not depend on the sampler)
SIZE, STEPS, GUIDANCE, SEED, N = 128, 4, 7.0, 5, 2
PROMPT, NEGATIVE = "a photo of a woman, studio portrait, soft light", "blurry, lowres"
W_FACE, W_STYLE = 0.9, 0.25
RANK = 8
PIXEL_TOL, MEAN_TOL = 2, 0.01


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def base():
    return load_base_model()


@pytest.fixture(scope="module")
def loras(base, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("parity_loras")
    return {
        "face": write_random_lora(d / "face.safetensors", base.unet, rank=4, alpha=8, seed=31, std=0.1),
        "style": write_random_lora(d / "style.safetensors", base.unet, rank=2, alpha=2, seed=32, std=0.2,
                                   target_modules=("to_k", "to_v", "to_out.0")),
        "face_te": write_random_lora(d / "face_te.safetensors", base.unet, rank=4, alpha=8, seed=33, std=0.1,
                                     text_encoder=base.text_encoder, te_rank=4, te_alpha=4),
    }


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def onnx(base, tmp_path_factory) -> dict:
    """The served nets, exported as the repository assembler exports them."""
    out = tmp_path_factory.mktemp("parity_onnx")
    export_onnx(base, out, models=("vae_decoder", "vae_encoder"), runtime_lora_rank=RANK)
    export_runtime_lora_text_encoder(base.text_encoder, out, dims=ModelDims.of(base), rank=RANK)
    sessions = {m: _session(out / m / "model.onnx")
                for m in ("text_encoder", "vae_decoder", "vae_encoder", "unet_lora")}
    return {"sessions": sessions, "manifest": read_lora_manifest(out / "unet_lora"),
            "te_manifest": read_lora_manifest(out / "text_encoder")}


def runtime_nets(base, onnx: dict, lora: dict[str, np.ndarray] | None = None, text_encode=None,
                 te_lora: dict[str, np.ndarray] | None = None) -> DiffusionNets:
    """facetron's in-process nets: ORT sessions; the runtime-LoRA UNet and text
    encoder (the served ones) fed one item's LoRA inputs (``lora`` / ``te_lora``:
    batch 1; None = zero LoRA = base model) per batch item."""
    s = onnx["sessions"]
    per_item = lora if lora is not None else zero_lora_inputs(onnx["manifest"])
    te_item = te_lora if te_lora is not None else zero_lora_inputs(onnx["te_manifest"])

    def unet(sample, t, hidden):
        n = len(sample)
        feed = {k: np.repeat(v, n, axis=0) for k, v in per_item.items()}
        return s["unet_lora"].run(None, {"sample": sample, "timestep": t, "encoder_hidden_states": hidden, **feed})[0]

    def te(ids):
        feed = {k: np.repeat(v, len(ids), axis=0) for k, v in te_item.items()}
        return s["text_encoder"].run(None, {"input_ids": ids, **feed})[0]

    return DiffusionNets(
        tokenize=ClipTokenizer(),
        text_encode=text_encode or te,
        unet=unet,
        vae_decode=lambda lat: s["vae_decoder"].run(None, {"latent": lat})[0],
        vae_encode=lambda img: s["vae_encoder"].run(None, {"images": img})[0],
        latent_channels=int(base.vae.config.latent_channels),
        latent_factor=base.latent_factor,
    )


def merged_nets(base, onnx: dict, unet: torch.nn.Module, text_encoder: torch.nn.Module) -> DiffusionNets:
    """Merged mode: the LoRA(s) fused by ``merge_loras`` (torch graphs of the merged UNet / text encoder)."""
    unet_graph, te_graph = graph_module("unet", unet=unet), graph_module("text_encoder", text_encoder=text_encoder)

    def unet_fn(sample, t, hidden):
        with torch.no_grad():
            return unet_graph(torch.from_numpy(sample), torch.from_numpy(t), torch.from_numpy(hidden)).numpy()

    def te_fn(ids):
        with torch.no_grad():
            return te_graph(torch.from_numpy(ids)).numpy()

    nets = runtime_nets(base, onnx)
    nets.unet, nets.text_encode = unet_fn, te_fn
    return nets


def diffusers_pipe(base, loras: list[tuple[Path, float]] = ()) -> StableDiffusionPipeline:
    """diffusers' pipeline over copies of the base model's parts, LoRAs loaded by
    ``load_lora_weights`` and weighted by ``set_adapters``."""
    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=copy.deepcopy(base.text_encoder), tokenizer=base.tokenizer,
                                   unet=copy.deepcopy(base.unet), scheduler=DDIMScheduler.from_config(base.scheduler.config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    names = []
    for i, (path, _) in enumerate(loras):
        names.append(f"lora{i}")
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=names[-1])
    if names:
        pipe.set_adapters(names, adapter_weights=[w for _, w in loras])
    return pipe


def diffusers_images(pipe, scheduler: str, *, steps: int = STEPS, template_latent: torch.Tensor | None = None,
                     strength: float = 1.0, prompt: str = PROMPT, seed: int = SEED, n: int = N,
                     guidance: float = GUIDANCE) -> np.ndarray:
    """diffusers' txt2img (or img2img from ``template_latent``), as uint8 the way its PIL output rounds.
    ``eta``: the pipeline's default (0.0) except for TCD, run at facetron's fixed TCD_ETA."""
    # from the base model's config every time (as facetron's make_scheduler): a config that a previous
    # call's scheduler wrote back (e.g. dpmsolver's use_karras_sigmas) must not leak into the next one
    if not hasattr(pipe, "_facetron_base_scheduler_config"):
        pipe._facetron_base_scheduler_config = dict(pipe.scheduler.config)
    config = pipe._facetron_base_scheduler_config
    pipe.scheduler = SCHEDULERS[scheduler].from_config(config, **SCHEDULER_SETTINGS[scheduler])
    generators = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    common = dict(negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=guidance, num_images_per_prompt=n,
                  generator=generators, output_type="np", eta=contract.TCD_ETA if scheduler == "tcd" else 0.0)
    with torch.no_grad():
        if template_latent is None:
            out = pipe(prompt, height=SIZE, width=SIZE, **common).images
        else:
            img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
            img2img.set_progress_bar_config(disable=True)
            out = img2img(prompt, image=template_latent, strength=strength, **common).images
    return (out * 255).round().astype(np.uint8)


def request(scheduler: str, steps: int = STEPS, strength: float = 1.0, seed: int = SEED, n: int = N,
            guidance: float = GUIDANCE) -> GenerationRequest:
    req = GenerationRequest(num_images=n, steps=steps, guidance=guidance, seed=seed, height=SIZE, width=SIZE,
                            scheduler=scheduler, strength=strength)
    req.validate()
    return req


def assert_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype == np.uint8, (got.shape, want.shape)
    diff = np.abs(got.astype(int) - want.astype(int))
    print(f"{what}: max {diff.max()}/255, mean {diff.mean():.4f}/255")
    assert diff.max() <= PIXEL_TOL and diff.mean() <= MEAN_TOL, (what, diff.max(), diff.mean())


def assert_differs(a: np.ndarray, b: np.ndarray, what: str) -> None:
    """The thing under test changes the pictures (a comparison of a thing with itself proves nothing)."""
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 2.0, what


# ----------------------------------------------------------------------------- text to image


# every scheduler at GUIDANCE; the few-step ones also as recommended (guidance 1: no negative branch) and at 8 steps
TXT2IMG_CASES = [(s, STEPS, GUIDANCE) for s in SCHEDULERS] + [("lcm", STEPS, 1.0), ("tcd", STEPS, 1.0), ("tcd", 8, 1.5)]


@pytest.mark.parametrize("scheduler, steps, guidance", TXT2IMG_CASES)
def test_txt2img_equals_stable_diffusion_pipeline(base, onnx, scheduler, steps, guidance) -> None:
    req = request(scheduler, steps=steps, guidance=guidance)
    got = generate(runtime_nets(base, onnx), dict(base.scheduler.config), PROMPT, NEGATIVE, req)
    want = diffusers_images(diffusers_pipe(base), scheduler, steps=steps, guidance=guidance)
    assert_close(got, want, f"txt2img {scheduler} steps={steps} guidance={guidance}")


# ----------------------------------------------------------------------------- few-step schedulers (lcm, tcd)


@pytest.mark.parametrize("scheduler", contract.FEW_STEP_SCHEDULERS)
def test_few_step_noise_is_drawn_from_each_images_generator(base, onnx, scheduler) -> None:
    """lcm / tcd draw fresh noise between steps, and it shows: diffusers with the
    same initial noise (``latents``) but its step noise from one shared generator
    gives other pictures. So the parity above checks where each image's step
    noise comes from (its own generator, after its initial noise)."""
    pipe = diffusers_pipe(base)
    pipe.scheduler = SCHEDULERS[scheduler].from_config(base.scheduler.config)
    with torch.no_grad():
        noise = torch.cat([torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(SEED + i))
                           for i in range(N)])
        one = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=1.0, num_images_per_prompt=N, latents=noise,
                   generator=torch.Generator().manual_seed(SEED), output_type="np", height=SIZE, width=SIZE,
                   eta=contract.TCD_ETA if scheduler == "tcd" else 0.0).images
    got = generate(runtime_nets(base, onnx), dict(base.scheduler.config), PROMPT, NEGATIVE,
                   request(scheduler, guidance=1.0))
    assert_differs(got, (one * 255).round().astype(np.uint8), f"{scheduler}: per-image step noise")


def test_few_step_limits_are_diffusers() -> None:
    """The contract's step limit for lcm / tcd is where diffusers' schedulers stop
    (a subset of the 50-step schedule), and TCD's fixed eta is TCDScheduler.step's default."""
    for name in contract.FEW_STEP_SCHEDULERS:
        scheduler = SCHEDULERS[name]()
        scheduler.set_timesteps(contract.FEW_STEP_MAX_STEPS)
        with pytest.raises(ValueError):
            scheduler.set_timesteps(contract.FEW_STEP_MAX_STEPS + 1)
        with pytest.raises(InvalidInputError, match="steps"):
            request(name, steps=contract.FEW_STEP_MAX_STEPS + 1)
    request("ddim", steps=contract.FEW_STEP_MAX_STEPS + 1)  # the others keep MAX_STEPS
    assert inspect.signature(TCDScheduler.step).parameters["eta"].default == contract.TCD_ETA


# ----------------------------------------------------------------------------- template mode (img2img)


def template_image() -> np.ndarray:
    """A smooth deterministic RGB picture (any picture will do: the VAE is random)."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    img = np.stack([np.sin(6 * x + 1), np.cos(5 * y), np.sin(4 * (x + y))], -1)
    return ((img + 1) * 127.5).round().astype(np.uint8)


def test_start_step_is_diffusers_get_timesteps(base) -> None:
    """facetron's start step = what StableDiffusionImg2ImgPipeline.get_timesteps gives
    for the Python float the client typed, also when it arrives as FP32 on the wire."""
    pipe = StableDiffusionImg2ImgPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                          unet=base.unet, scheduler=DDIMScheduler.from_config(base.scheduler.config),
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    for steps in range(1, 51):
        pipe.scheduler.set_timesteps(steps)
        for strength in np.round(np.arange(0.05, 1.0001, 0.05), 2):
            _, run = pipe.get_timesteps(steps, float(strength), "cpu")
            if run == 0:
                continue  # diffusers has no step left to run there; facetron runs the last one
            for sent in (float(strength), np.float32(strength), float(np.float32(strength))):
                assert steps - start_step(steps, sent) == run, (steps, strength, sent)
    assert start_step(10, np.float32(0.7)) == 3 and start_step(8, 0.6) == 4  # 7 and 4 steps run


# (scheduler, steps, strength typed by the client, sent as FP32 on the wire?, guidance)
TEMPLATE_CASES = [("dpmsolver", 8, 0.6, False, GUIDANCE), ("euler", 10, 0.7, True, GUIDANCE),
                  ("ddim", 6, 0.5, True, GUIDANCE), ("lcm", 8, 0.6, False, 1.0), ("tcd", 6, 0.7, True, 1.0),
                  ("lcm", 4, 0.5, False, 2.0)]


@pytest.mark.parametrize("scheduler, steps, strength, fp32, guidance", TEMPLATE_CASES)
def test_template_mode_equals_img2img_pipeline(base, onnx, scheduler, steps, strength, fp32, guidance) -> None:
    """Template mode before the face-region paste: facetron's vae_encoder (the
    latent *mean*), denoise from start_step, vae_decoder; diffusers' img2img
    given diffusers' own latent mean as a 4-channel ``image`` and the strength
    the client typed (facetron gets it as the FP32 the wire carries: 0.7 ->
    0.699999988, where diffusers' int(10 * 0.7) = 7 steps must still hold)."""
    nets = runtime_nets(base, onnx)
    image = template_image()
    init = nets.vae_encode(image[None])
    with torch.no_grad():
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
        mean = base.vae.encode(x).latent_dist.mean * base.vae.config.scaling_factor
    assert float(np.abs(init - mean.numpy()).max()) < 1e-4  # the served encoder is the VAE mean

    hidden = nets.text_encode(nets.tokenize([PROMPT, NEGATIVE]))
    req = request(scheduler, steps=steps, strength=float(np.float32(strength)) if fp32 else strength, guidance=guidance)
    got = nets.vae_decode(denoise(nets.unet, dict(base.scheduler.config), hidden[:1], hidden[1:], req,
                                  nets.latent_channels, nets.latent_factor, init_latents=init))
    want = diffusers_images(diffusers_pipe(base), scheduler, steps=steps, template_latent=mean, strength=float(strength),
                            guidance=guidance)
    assert_close(got, want, f"template {scheduler} steps={steps} strength={strength} guidance={guidance}")
    # one step more or less (the old round() rule) is far outside the tolerance
    one_more = (steps - start_step(steps, strength) + 1.5) / steps
    other = diffusers_images(diffusers_pipe(base), scheduler, steps=steps, template_latent=mean, strength=one_more,
                             guidance=guidance)
    assert_differs(got, other, "a different start step")


# ----------------------------------------------------------------------------- LoRAs: runtime and merged


@pytest.fixture(scope="module")
def lora_pipe(base, loras):
    """diffusers with the user's face LoRA and a style LoRA: load_lora_weights + set_adapters."""
    return diffusers_pipe(base, [(loras["face"], W_FACE), (loras["style"], W_STYLE)])


@pytest.mark.parametrize("scheduler", CLASSIC)
def test_face_and_style_lora_equal_diffusers_set_adapters(base, onnx, loras, lora_pipe, scheduler) -> None:
    want = diffusers_images(lora_pipe, scheduler)
    sched = dict(base.scheduler.config)
    # runtime LoRA: numpy LoRA inputs into the one runtime-LoRA graph
    inputs = lora_inputs_for(loras["face"], onnx["manifest"], W_FACE, extra=[(loras["style"], W_STYLE)])
    runtime = generate(runtime_nets(base, onnx, inputs), sched, PROMPT, NEGATIVE, request(scheduler))
    assert_close(runtime, want, f"runtime LoRA face+style {scheduler}")
    # merged: the LoRAs fused into the weights
    unet, te = merge_loras(base, loras["face"], loras["style"], w_face=W_FACE, w_style=W_STYLE)
    merged = generate(merged_nets(base, onnx, unet, te), sched, PROMPT, NEGATIVE, request(scheduler))
    assert_close(merged, want, f"merged face+style {scheduler}")
    if scheduler == "dpmsolver":
        assert_differs(runtime, diffusers_images(diffusers_pipe(base), scheduler), "the LoRAs")


@pytest.mark.parametrize("scheduler", CLASSIC)
def test_text_encoder_lora_runtime_and_merged_equal_diffusers(base, onnx, loras, scheduler) -> None:
    """A face LoRA with text-encoder layers (+ style), diffusers' load_lora_weights
    loading both parts: runtime mode (both runtime-LoRA graphs, each fed its part
    of the LoRA), merged mode as served (the UNet fused by merge_loras, the text
    side the runtime-LoRA text encoder) and a fully fused pair all equal it."""
    paths = [(loras["face_te"], W_FACE), (loras["style"], W_STYLE)]
    want = diffusers_images(diffusers_pipe(base, paths), scheduler)
    sched = dict(base.scheduler.config)
    unet_in = lora_inputs_for(loras["face_te"], onnx["manifest"], W_FACE, extra=[(loras["style"], W_STYLE)])
    te_in = lora_inputs_for(loras["face_te"], onnx["te_manifest"], W_FACE)
    runtime = generate(runtime_nets(base, onnx, unet_in, te_lora=te_in), sched, PROMPT, NEGATIVE, request(scheduler))
    assert_close(runtime, want, f"runtime face(+text encoder)+style {scheduler}")
    unet, te = merge_loras(base, loras["face_te"], loras["style"], w_face=W_FACE, w_style=W_STYLE)
    served_merged = merged_nets(base, onnx, unet, te)
    served_merged.text_encode = runtime_nets(base, onnx, te_lora=te_in).text_encode
    merged = generate(served_merged, sched, PROMPT, NEGATIVE, request(scheduler))
    assert_close(merged, want, f"merged UNet + runtime text encoder, face(+text encoder)+style {scheduler}")
    fused = generate(merged_nets(base, onnx, unet, te), sched, PROMPT, NEGATIVE, request(scheduler))
    assert_close(fused, want, f"merged UNet + fused text encoder {scheduler}")
    unet_only = generate(runtime_nets(base, onnx, unet_in), sched, PROMPT, NEGATIVE, request(scheduler))
    assert_differs(runtime, unet_only, "the text-encoder LoRA")


# ----------------------------------------------------------------------------- served by Triton


SERVED_STYLE = "parity-style"


@pytest.mark.triton
def test_served_user_and_style_lora_equal_diffusers(base, loras, lora_pipe, client, users_dir) -> None:
    """portrait_generator on the real server (runtime-LoRA unet, its bank reading
    the user's LoRA from the user registry and the style's from the style
    registry beside it; tokenizer, text encoder and VAE over BLS) equals
    diffusers with load_lora_weights + set_adapters([face, style], [w_face, w_style])."""
    from facetron.style_registry import styles_for
    from facetron.users import UserRegistry

    registry = UserRegistry(users_dir)
    registry.save_reference_embedding("parity-user", np.ones((1, 128), np.float32))
    grant(registry, "parity-user")
    registry.install_lora("parity-user", loras["face"])
    styles_for(users_dir).add(SERVED_STYLE, "a photo of {trigger}", lora_file=loras["style"], weight=W_STYLE, replace=True)
    scheduler = "euler"
    inputs = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "user_id": "parity-user", "style": SERVED_STYLE,
              "scheduler": scheduler}
    request = {k: np.array([v.encode()], dtype=object) for k, v in inputs.items()}
    request.update(num_images=np.array([N], np.int32), steps=np.array([STEPS], np.int32),
                   seed=np.array([SEED], np.int64), guidance=np.array([GUIDANCE], np.float32))
    served = client.infer("portrait_generator", request, ["images"])["images"]
    assert_close(served, diffusers_images(lora_pipe, scheduler), f"served user+style LoRA {scheduler}")


@pytest.mark.triton
def test_served_text_encoder_lora_equals_diffusers(base, loras, client, users_dir) -> None:
    """A user whose LoRA has text-encoder layers, through portrait_generator (runtime
    mode: the text_encoder's bank and the unet's bank each read their part of the
    user's LoRA) equals diffusers' load_lora_weights of the whole file."""
    from facetron.users import UserRegistry

    registry = UserRegistry(users_dir)
    registry.save_reference_embedding("parity-te-user", np.ones((1, 128), np.float32))
    grant(registry, "parity-te-user")
    registry.install_lora("parity-te-user", loras["face_te"])
    scheduler = "dpmsolver"
    inputs = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "user_id": "parity-te-user", "scheduler": scheduler}
    request = {k: np.array([v.encode()], dtype=object) for k, v in inputs.items()}
    request.update(num_images=np.array([N], np.int32), steps=np.array([STEPS], np.int32),
                   seed=np.array([SEED], np.int64), guidance=np.array([GUIDANCE], np.float32))
    served = client.infer("portrait_generator", request, ["images"])["images"]
    want = diffusers_images(diffusers_pipe(base, [(loras["face_te"], W_FACE)]), scheduler)
    assert_close(served, want, f"served user LoRA with text-encoder layers {scheduler}")
