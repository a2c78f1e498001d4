"""facetron computes what diffusers computes: the oracle is diffusers' own
``StableDiffusionPipeline`` / ``StableDiffusionInpaintPipeline`` (template
mode) / ``StableDiffusionImg2ImgPipeline`` (and peft's LoRA layers under
``load_lora_weights`` + ``set_adapters``) on the tiny default model, never
facetron's own sampler or merge.

facetron's side runs the served code path in-process: the exported ONNX nets
in ONNX Runtime (text encoder, runtime-LoRA UNet, VAE decoder / encoder),
facetron's tokenizer, :func:`facetron.pipeline.generation.generate` (template
mode included: the inpainting of the template's face mask, no paste), and
:func:`facetron.diffusion.sampler.denoise` + the VAE decoder for img2img; and
through the served Triton models. Same scheduler config, seeds (image i:
``seed + i``), steps, guidance. An inpainting (9-channel) UNet is checked here in
process, with a tiny random ``UNet2DConditionModel`` as the UNet on both
sides; served (``export repository --inpaint-unet``, the ``unet_inpaint``
model) in tests/test_inpaint_unet.py.
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
  (measured 0.0001; the inpainting UNet 0.005: its masked template is uint8
  128 where diffusers' is 0.0 = 127.5, see ``test_inpainting_unet_...``).
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
                       StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline,
                       TCDScheduler, UNet2DConditionModel)

from facetron import contract
from facetron.diffusion.base_model import load_base_model
from facetron.diffusion.clip_tokenizer import ClipTokenizer
from facetron.diffusion.lora_inputs import lora_inputs_for, read_lora_manifest, zero_lora_inputs
from facetron.diffusion.nets import DiffusionNets
from facetron.diffusion.model_spec import TINY
from facetron.diffusion.sampler import SCHEDULER_SETTINGS, GenerationRequest, denoise, start_step
from facetron.diffusion.step_cache import step_cached
from facetron.errors import InvalidInputError
from facetron.export.merge import merge_loras
from facetron.export.onnx_export import export_onnx, graph_module
from facetron.export.onnx_graph import ModelDims
from facetron.export.runtime_lora import export_runtime_lora_text_encoder
from facetron.export.step_cache_graphs import DeepCacheUNet
from facetron.faces.detector import FaceDetector
from facetron.pipeline.generation import generate
from facetron.pipeline.net_io import pack_detections
from facetron.pipeline.template import (PreparedTemplate, face_region_mask, latent_mask, masked_template,
                                       prepare_template)
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


def diffusers_pipe(base, loras: list[tuple[Path, float]] = (), unet: torch.nn.Module | None = None
                   ) -> StableDiffusionPipeline:
    """diffusers' pipeline over copies of the base model's parts (``unet``: another UNet), LoRAs loaded by
    ``load_lora_weights`` and weighted by ``set_adapters``."""
    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=copy.deepcopy(base.text_encoder), tokenizer=base.tokenizer,
                                   unet=copy.deepcopy(base.unet if unet is None else unet), scheduler=DDIMScheduler.from_config(base.scheduler.config),
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
                     guidance: float = GUIDANCE, mask: np.ndarray | None = None,
                     masked_latent: torch.Tensor | None = None) -> np.ndarray:
    """diffusers' txt2img, img2img from ``template_latent``, or with ``mask`` ([H, W] pixels, 1 = repainted)
    too ``StableDiffusionInpaintPipeline`` (``padding_mask_crop=None``), as uint8 the way its PIL output rounds.
    The inpaint pipeline gets the latents as 4-channel tensors, which it takes as they are: ``image`` =
    ``template_latent``, ``masked_image_latents`` = ``masked_latent`` (what an inpainting UNet is fed; a
    4-channel UNet never reads it, and diffusers' own masked image, pixels x a pixel mask, does not broadcast
    with a latent ``image``: ``template_latent`` stands in).
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
        elif mask is not None:
            inpaint = StableDiffusionInpaintPipeline(**pipe.components)
            inpaint.set_progress_bar_config(disable=True)
            masked = template_latent if masked_latent is None else masked_latent
            out = inpaint(prompt, image=template_latent, mask_image=mask[..., None], masked_image_latents=masked,
                          height=SIZE, width=SIZE, strength=strength, **common).images
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


# ----------------------------------------------------------------------------- template mode (inpainting)

#: a face in template_image()'s frame (eyes, nose, mouth corners): its mask covers ~40% of the picture
TEMPLATE_LANDMARKS = np.array([[48, 54], [80, 54], [64, 70], [52, 86], [76, 86]], np.float32)


def template_image() -> np.ndarray:
    """A smooth deterministic RGB picture (any picture will do: the VAE is random)."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    img = np.stack([np.sin(6 * x + 1), np.cos(5 * y), np.sin(4 * (x + y))], -1)
    return ((img + 1) * 127.5).round().astype(np.uint8)


def template() -> PreparedTemplate:
    """template_image() with its face at TEMPLATE_LANDMARKS and the masks built from them."""
    return PreparedTemplate.of(template_image(), TEMPLATE_LANDMARKS)


def vae_mean(base, pixels: torch.Tensor) -> torch.Tensor:
    """diffusers' VAE latent mean x scaling factor of [1, 3, H, W] pixels in [-1, 1]."""
    with torch.no_grad():
        return base.vae.encode(pixels).latent_dist.mean * base.vae.config.scaling_factor


def pixels(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> [1, 3, H, W] in [-1, 1], as diffusers' image processor normalizes it."""
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1


def numpy_unet(unet: torch.nn.Module):
    """A torch UNet2DConditionModel as the loop's numpy ``unet(sample, t, hidden)``."""
    def call(sample, t, hidden, **_):
        with torch.no_grad():
            return unet(torch.from_numpy(sample), torch.from_numpy(t), torch.from_numpy(hidden)).sample.numpy()
    return call


def test_start_step_is_diffusers_get_timesteps(base) -> None:
    """facetron's start step = what StableDiffusionInpaintPipeline.get_timesteps (a copy of
    StableDiffusionImg2ImgPipeline's) gives for the Python float the client typed, also when
    it arrives as FP32 on the wire."""
    for cls in (StableDiffusionInpaintPipeline, StableDiffusionImg2ImgPipeline):
        pipe = cls(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
                   scheduler=DDIMScheduler.from_config(base.scheduler.config), safety_checker=None,
                   feature_extractor=None, requires_safety_checker=False)
        for steps in range(1, 51):
            pipe.scheduler.set_timesteps(steps)
            for strength in np.round(np.arange(0.05, 1.0001, 0.05), 2):
                _, run = pipe.get_timesteps(steps, float(strength), "cpu")
                if run == 0:
                    continue  # diffusers has no step left to run there; facetron runs the last one
                for sent in (float(strength), np.float32(strength), float(np.float32(strength))):
                    assert steps - start_step(steps, sent) == run, (cls.__name__, steps, strength, sent)
    assert start_step(10, np.float32(0.7)) == 3 and start_step(8, 0.6) == 4  # 7 and 4 steps run


def test_template_mask_is_what_the_inpaint_pipeline_makes_of_it(base) -> None:
    """The latent mask (template.latent_mask) = StableDiffusionInpaintPipeline's own processing of
    the pixel mask: its ``mask_processor`` (binarize at 0.5) then ``prepare_mask_latents`` (interpolate,
    nearest, to latent size); for the face ellipse (template.mask) and a feathered (float) mask, on a
    square and a non-square picture."""
    pipe = StableDiffusionInpaintPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                          unet=base.unet, scheduler=DDIMScheduler.from_config(base.scheduler.config),
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    f = base.latent_factor
    shapes = (((SIZE, SIZE), TEMPLATE_LANDMARKS), ((96, 160), TEMPLATE_LANDMARKS * [1.1, 0.6] + [21, 3]))
    for (h, w), landmarks in shapes:
        prepared = PreparedTemplate.of(np.zeros((h, w, 3), np.uint8), landmarks, f)
        assert prepared.latent_mask.shape == (h // f, w // f) and 0.1 < prepared.latent_mask.mean() < 0.9
        np.testing.assert_array_equal(prepared.latent_mask, latent_mask(prepared.mask, f))
        for pixel_mask in (prepared.mask, face_region_mask((h, w), landmarks)[..., 0]):
            condition = pipe.mask_processor.preprocess(pixel_mask[..., None], height=h, width=w)
            want, _ = pipe.prepare_mask_latents(condition, torch.zeros(1, 4, h // f, w // f), 1, h, w, torch.float32,
                                                "cpu", None, False)
            np.testing.assert_array_equal(latent_mask(pixel_mask, f), want[0, 0].numpy())


# (scheduler, steps, strength typed by the client, sent as FP32 on the wire?, guidance); strength 1 starts from
# pure noise (the inpaint pipeline's is_strength_max), not from the template noised to the first timestep
TEMPLATE_CASES = [("dpmsolver", 8, 0.6, False, GUIDANCE), ("euler", 10, 0.7, True, GUIDANCE),
                  ("ddim", 6, 0.5, True, GUIDANCE), ("lcm", 8, 0.6, False, 1.0), ("tcd", 6, 0.7, True, 1.0),
                  ("lcm", 4, 0.5, False, 2.0), ("euler", 4, 1.0, False, GUIDANCE)]


def case_id(scheduler: str, steps: int, strength: float, fp32: bool, guidance: float) -> str:
    return f"{scheduler}-{steps}steps-strength{strength}{'fp32' if fp32 else ''}-guidance{guidance:g}"


@pytest.mark.parametrize("scheduler, steps, strength, fp32, guidance", TEMPLATE_CASES,
                         ids=[case_id(*c) for c in TEMPLATE_CASES])
def test_template_mode_equals_inpaint_pipeline(base, onnx, scheduler, steps, strength, fp32, guidance) -> None:
    """Template mode as served: ``generate`` with a template (facetron's vae_encoder — the latent
    *mean* —, the face mask at latent resolution, denoise from start_step with the region outside the
    mask blended back after every step, vae_decoder, no paste) equals StableDiffusionInpaintPipeline
    (4-channel UNet branch, ``padding_mask_crop=None``) given diffusers' own latent mean as a 4-channel
    ``image``, the pixel mask as ``mask_image`` and the strength the client typed (facetron gets it as
    the FP32 the wire carries: 0.7 -> 0.699999988, where diffusers' int(10 * 0.7) = 7 steps must hold)."""
    nets = runtime_nets(base, onnx)
    prepared = template()
    mean = vae_mean(base, pixels(prepared.image))
    assert float(np.abs(nets.vae_encode(prepared.image[None]) - mean.numpy()).max()) < 1e-4  # the served encoder: mean

    req = request(scheduler, steps=steps, strength=float(np.float32(strength)) if fp32 else strength, guidance=guidance)
    got = generate(nets, dict(base.scheduler.config), PROMPT, NEGATIVE, req, template=prepared)
    want = diffusers_images(diffusers_pipe(base), scheduler, steps=steps, template_latent=mean, mask=prepared.mask,
                            strength=float(strength), guidance=guidance)
    assert_close(got, want, f"template {scheduler} steps={steps} strength={strength} guidance={guidance}")
    if strength < 1.0:  # one step more or less (the old round() rule) is far outside the tolerance
        one_more = (steps - start_step(steps, strength) + 1.5) / steps
        other = diffusers_images(diffusers_pipe(base), scheduler, steps=steps, template_latent=mean, mask=prepared.mask,
                                 strength=one_more, guidance=guidance)
        assert_differs(got, other, "a different start step")


@pytest.mark.parametrize("scheduler, steps, strength, fp32, guidance", [TEMPLATE_CASES[0], TEMPLATE_CASES[4]],
                         ids=[case_id(*TEMPLATE_CASES[0]), case_id(*TEMPLATE_CASES[4])])
def test_init_latents_without_mask_equal_img2img_pipeline(base, onnx, scheduler, steps, strength, fp32,
                                                          guidance) -> None:
    """``denoise`` given ``init_latents`` and no mask is StableDiffusionImg2ImgPipeline (the whole
    template re-noised and denoised), given diffusers' latent mean as a 4-channel ``image``."""
    nets = runtime_nets(base, onnx)
    image = template_image()
    hidden = nets.text_encode(nets.tokenize([PROMPT, NEGATIVE]))
    req = request(scheduler, steps=steps, strength=float(np.float32(strength)) if fp32 else strength, guidance=guidance)
    got = nets.vae_decode(denoise(nets.unet, dict(base.scheduler.config), hidden[:1], hidden[1:], req,
                                  nets.latent_channels, nets.latent_factor, init_latents=nets.vae_encode(image[None])))
    want = diffusers_images(diffusers_pipe(base), scheduler, steps=steps, template_latent=vae_mean(base, pixels(image)),
                            strength=float(strength), guidance=guidance)
    assert_close(got, want, f"img2img {scheduler} steps={steps} strength={strength} guidance={guidance}")


#: the tiny model's VAE round trip of template_image(), outside the mask (mean |decode(encode(x)) - x|, uint8
#: levels): the VAE is random and reconstructs nothing. Template mode's output is as far from the template there.
ROUND_TRIP_ERROR = 85.0


def test_outside_the_mask_template_mode_keeps_the_template(base, onnx) -> None:
    """The known region. After the last step the latents outside the mask ARE the template's latent,
    bit for bit, with every scheduler (inside they are generated). In pixels (no paste) the output
    outside the mask is as far from the template as the VAE's own round trip of it: measured 82.6/255
    mean vs a round-trip error of 85.0/255 (dpmsolver, 8 steps at 0.6). The tiny random VAE
    reconstructs nothing and its decoder's mid-block attention mixes the whole latent, so the output
    outside the mask differs from the round-trip image itself by 30/255 on average; the exact claim
    is the latent one. ``paste_template=True`` puts the template's own pixels back: outside its
    feathered face region the output is the template exactly."""
    nets = runtime_nets(base, onnx)
    prepared = template()
    init = nets.vae_encode(prepared.image[None])
    hidden = nets.text_encode(nets.tokenize([PROMPT, NEGATIVE]))
    outside = prepared.latent_mask == 0
    for scheduler in SCHEDULERS:
        req = request(scheduler, steps=6, strength=0.7, guidance=GUIDANCE)
        latents = denoise(nets.unet, dict(base.scheduler.config), hidden[:1], hidden[1:], req, nets.latent_channels,
                          nets.latent_factor, init_latents=init, mask=prepared.latent_mask)
        known = np.broadcast_to(init, latents.shape)
        assert np.array_equal(latents[:, :, outside], known[:, :, outside]), scheduler
        assert np.abs(latents - known)[:, :, ~outside].mean() > 0.1, scheduler  # the face region is generated

    px_outside = prepared.mask == 0
    req = request("dpmsolver", steps=8, strength=0.6)
    got = generate(nets, dict(base.scheduler.config), PROMPT, NEGATIVE, req, template=prepared).astype(int)
    template_px, round_trip = prepared.image.astype(int), nets.vae_decode(init)[0].astype(int)
    round_trip_error = np.abs(round_trip - template_px)[px_outside].mean()
    error = np.abs(got - template_px)[:, px_outside].mean()
    leak = np.abs(got - round_trip)[:, px_outside].mean()
    print(f"outside the mask: output vs template {error:.1f}/255, VAE round trip vs template "
          f"{round_trip_error:.1f}/255, output vs round trip {leak:.1f}/255")
    assert abs(round_trip_error - ROUND_TRIP_ERROR) < 1.0 and error <= round_trip_error
    pasted = generate(nets, dict(base.scheduler.config), PROMPT, NEGATIVE, req, template=prepared, paste_template=True)
    untouched = face_region_mask(prepared.image.shape, prepared.landmarks)[..., 0] == 0
    assert np.array_equal(pasted[:, untouched], np.broadcast_to(prepared.image, pasted.shape)[:, untouched])


def test_step_cache_in_template_mode(base) -> None:
    """Step caching with mask blending: the cached UNet is the loop's ``unet`` callable and the
    blend runs after each scheduler step as without it, so the region outside the mask is still the
    template's latent bit for bit; the run makes ceil(run steps / 2) full evaluations (the steps that
    run from the start step, not ``steps``). The tiny UNet's torch graphs (DeepCacheUNet)."""
    dc = DeepCacheUNet(base.unet)

    def numpy_fn(fn):
        def call(*arrays, **_):
            with torch.no_grad():
                out = fn(*(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays))
            return tuple(o.numpy() for o in out) if isinstance(out, tuple) else out.numpy()
        return call

    prepared = template()
    init = vae_mean(base, pixels(prepared.image)).numpy()
    rng = np.random.default_rng(7)
    cond, uncond = (rng.standard_normal((1, 77, 32)).astype(np.float32) for _ in range(2))
    req = request("dpmsolver", steps=10, strength=0.6)  # 6 steps run
    run = {}
    for interval in (1, 2):
        unet = step_cached(numpy_unet(base.unet), numpy_fn(dc.full), numpy_fn(dc.shallow), interval)
        run[interval] = denoise(unet, dict(base.scheduler.config), cond, uncond, req, 4, base.latent_factor,
                                init_latents=init, mask=prepared.latent_mask)
        if interval == 2:
            assert (unet.full_calls, unet.shallow_calls) == (3, 3)
    outside = prepared.latent_mask == 0
    for latents in run.values():
        assert np.array_equal(latents[:, :, outside], np.broadcast_to(init, latents.shape)[:, :, outside])
    assert not np.array_equal(run[1], run[2])  # the cache ran: the face region differs a little


# ----------------------------------------------------------------------------- template mode: an inpainting UNet


@pytest.fixture(scope="module")
def inpainting_unet() -> UNet2DConditionModel:
    """A tiny random inpainting UNet (SD-1.5 inpainting's layout): the tiny model's UNet config with
    9 input channels (latents, mask, masked-template latents), weights from a fixed seed."""
    torch.manual_seed(7)
    return UNet2DConditionModel(**{**TINY.unet, "in_channels": 9}).eval()


INPAINTING_CASES = [("dpmsolver", 8, 0.6, GUIDANCE), ("euler", 6, 1.0, GUIDANCE), ("ddim", 6, 0.5, GUIDANCE),
                    ("lcm", 4, 0.5, 1.0), ("tcd", 6, 0.7, 1.0)]


@pytest.mark.parametrize("scheduler, steps, strength, guidance", INPAINTING_CASES,
                         ids=[case_id(s, st, x, False, g) for s, st, x, g in INPAINTING_CASES])
def test_inpainting_unet_equals_inpaint_pipeline(base, onnx, inpainting_unet, scheduler, steps, strength,
                                                 guidance) -> None:
    """``generate(..., unet_in_channels=9)`` (in process; served as ``unet_inpaint``: tests/test_inpaint_unet.py) equals
    StableDiffusionInpaintPipeline with the same UNet (its ``num_channels_unet == 9`` branch: mask and
    masked-image latents concatenated to the scaled sample, no blending). diffusers gets its own
    masked image's latent mean (template x (mask < 0.5): 0.0 in the region); facetron encodes the
    uint8 masked template on its vae_encoder (128 there, the nearest to 0.0 = 127.5): the latents
    differ by 4e-4, the pictures by at most 1/255 (mean <= 0.005/255)."""
    nets = runtime_nets(base, onnx)
    nets.unet = numpy_unet(inpainting_unet)
    prepared = template()
    x = pixels(prepared.image)
    masked = vae_mean(base, x * (torch.from_numpy(prepared.mask)[None, None] < 0.5))
    assert float(np.abs(nets.vae_encode(masked_template(prepared)[None]) - masked.numpy()).max()) < 1e-3
    req = request(scheduler, steps=steps, strength=strength, guidance=guidance)
    got = generate(nets, dict(base.scheduler.config), PROMPT, NEGATIVE, req, template=prepared, unet_in_channels=9)
    want = diffusers_images(diffusers_pipe(base, unet=inpainting_unet), scheduler, steps=steps,
                            template_latent=vae_mean(base, x), mask=prepared.mask, masked_latent=masked,
                            strength=strength, guidance=guidance)
    assert_close(got, want, f"inpainting UNet {scheduler} steps={steps} strength={strength} guidance={guidance}")


def test_inpainting_unet_needs_a_template_and_no_step_cache(base, onnx) -> None:
    nets = runtime_nets(base, onnx)
    sched = dict(base.scheduler.config)
    with pytest.raises(InvalidInputError, match="template: an inpainting UNet needs a template"):
        generate(nets, sched, PROMPT, NEGATIVE, request("euler"), unet_in_channels=9)
    cached = GenerationRequest(num_images=1, steps=4, height=SIZE, width=SIZE, strength=0.5, cache_interval=2)
    with pytest.raises(InvalidInputError, match="cache_interval: step caching has no graphs for an inpainting UNet"):
        generate(nets, sched, PROMPT, NEGATIVE, cached, template=template(), unet_in_channels=9)
    with pytest.raises(ValueError, match="unet_in_channels"):
        generate(nets, sched, PROMPT, NEGATIVE, request("euler"), template=template(), unet_in_channels=8)


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


def test_template_mode_with_face_and_style_lora_equals_diffusers(base, onnx, loras, lora_pipe) -> None:
    """Runtime LoRA in template mode: the face + style LoRA inputs ride with every UNet call of the
    inpainting loop; diffusers' inpaint pipeline over load_lora_weights + set_adapters."""
    prepared = template()
    inputs = lora_inputs_for(loras["face"], onnx["manifest"], W_FACE, extra=[(loras["style"], W_STYLE)])
    req = request("euler", steps=6, strength=0.7)
    got = generate(runtime_nets(base, onnx, inputs), dict(base.scheduler.config), PROMPT, NEGATIVE, req,
                   template=prepared)
    want = diffusers_images(lora_pipe, "euler", steps=6, template_latent=vae_mean(base, pixels(prepared.image)),
                            mask=prepared.mask, strength=0.7)
    assert_close(got, want, "template mode, runtime LoRA face+style euler")
    plain = generate(runtime_nets(base, onnx), dict(base.scheduler.config), PROMPT, NEGATIVE, req, template=prepared)
    assert_differs(got, plain, "the LoRAs in template mode")


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


@pytest.mark.triton
def test_served_template_mode_equals_inpaint_pipeline(base, client) -> None:
    """portrait_generator with a template (fitted, its face found by the served face_detector, its
    mask built, inpainted over the BLS nets, no paste) equals StableDiffusionInpaintPipeline on the
    same fitted template, the mask built from the in-process detector's landmarks (the same ONNX
    detector), the strength sent as FP32 (0.7 -> 7 of 10 steps, as diffusers' int(10 * 0.7))."""
    from facetron.training.demo_templates import demo_templates

    detector = FaceDetector()
    _, photo = demo_templates(detector, size=SIZE, count=1)[0]
    prepared = prepare_template(photo, SIZE, SIZE, lambda images: pack_detections(detector.detect_batch(list(images))))
    scheduler, steps, strength = "dpmsolver", 10, 0.7
    inputs = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "scheduler": scheduler}
    request = {k: np.array([v.encode()], dtype=object) for k, v in inputs.items()}
    request.update(num_images=np.array([N], np.int32), steps=np.array([steps], np.int32),
                   seed=np.array([SEED], np.int64), guidance=np.array([GUIDANCE], np.float32),
                   height=np.array([SIZE], np.int32), width=np.array([SIZE], np.int32),
                   template=photo, strength=np.array([strength], np.float32))
    served = client.infer("portrait_generator", request, ["images"])["images"]
    want = diffusers_images(diffusers_pipe(base), scheduler, steps=steps, strength=strength, mask=prepared.mask,
                            template_latent=vae_mean(base, pixels(prepared.image)))
    assert_close(served, want, f"served template mode {scheduler} steps={steps} strength={strength}")
