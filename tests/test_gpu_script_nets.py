"""benchmarks/sd15_nets.py (the pure-torch nets of benchmarks/gpu_script.py) against diffusers and
transformers: equal state_dict keys and shapes (SD-1.5 on the meta device, no memory), equal outputs
(tiny configs, random weights, fp32 CPU), and the DPM-Solver++ scheduler as facetron configures it."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from facetron import contract
from facetron.benchmarks import sd15_nets as nets
from facetron.diffusion import model_spec
from facetron.diffusion.model_spec import SD15_SCHEDULER
from facetron.diffusion.sampler import SCHEDULER_SETTINGS, make_scheduler

ATOL = 1e-4
VAE_SUBSET = ("decoder.", "post_quant_conv.")


def _oracles(spec: dict) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    return (UNet2DConditionModel(**spec["unet"]), AutoencoderKL(**spec["vae"]),
            CLIPTextModel(CLIPTextConfig(**spec["text_encoder"])))


def _ours(spec: dict) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    return (nets.UNet2DConditionModel(**spec["unet"]), nets.AutoencoderKL(**spec["vae"]),
            nets.CLIPTextModel(**spec["text_encoder"]))


def _vae_subset(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith(VAE_SUBSET)}


def _clip_checkpoint_keys(state: dict) -> dict:
    """transformers 5 keeps CLIPTextModel's weights without the checkpoint's ``text_model.`` prefix."""
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}


def _shapes(state: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


def test_the_marked_copies_stay_equal() -> None:
    """sd15_nets travels alone to a GPU machine, so it copies facetron's CLIP numbers and net configs
    (``# Copied from`` in it): they stay equal to the originals."""
    assert (nets.TOKENS, nets.VOCAB_SIZE) == (contract.TOKENS, contract.VOCAB_SIZE)
    for ours, theirs in ((nets.SD15, model_spec.SD15), (nets.TINY, model_spec.TINY)):
        assert ours["unet"] == theirs.unet and ours["vae"] == theirs.vae
        assert ours["text_encoder"] == theirs.text_encoder and ours["latent"] == theirs.latent_size


@pytest.fixture(scope="module")
def tiny_pairs():
    torch.manual_seed(0)
    theirs = [m.eval() for m in _oracles(nets.TINY)]
    ours = [m.eval() for m in _ours(nets.TINY)]
    unet, vae, te = theirs
    ours[0].load_state_dict(unet.state_dict(), strict=True)
    ours[1].load_state_dict(_vae_subset(vae.state_dict()), strict=True)
    ours[2].load_state_dict(_clip_checkpoint_keys(te.state_dict()), strict=True)
    return dict(zip(("unet", "vae", "te"), zip(theirs, ours)))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype
    return (a - b).abs().max().item()


@torch.no_grad()
@pytest.mark.parametrize("timestep", [500, "batch"])
def test_tiny_unet_equals_diffusers(tiny_pairs, timestep) -> None:
    theirs, ours = tiny_pairs["unet"]
    g = torch.Generator().manual_seed(1)
    lat, ctx = nets.TINY["latent"], nets.TINY["unet"]["cross_attention_dim"]
    sample, hidden = torch.randn(2, 4, lat, lat, generator=g), torch.randn(2, 77, ctx, generator=g)
    t = torch.tensor([981.0, 17.0]) if timestep == "batch" else timestep
    want = theirs(sample, t, encoder_hidden_states=hidden, return_dict=False)[0]
    got = ours(sample, t, hidden)
    diff = _max_diff(got, want)
    print(f"unet t={timestep}: max abs diff {diff:.2e} (|out| max {want.abs().max():.2f})")
    assert diff <= ATOL
    if timestep == "batch":  # the two timesteps really reach the two samples
        single = ours(sample[1:], torch.tensor(17.0), hidden[1:])
        assert _max_diff(single, got[1:]) <= ATOL and _max_diff(got[:1], got[1:]) > 1e-3


@torch.no_grad()
def test_tiny_vae_decode_equals_diffusers(tiny_pairs) -> None:
    theirs, ours = tiny_pairs["vae"]
    latents = torch.randn(1, 4, nets.TINY["latent"], nets.TINY["latent"], generator=torch.Generator().manual_seed(2))
    want = theirs.decode(latents / theirs.config.scaling_factor, return_dict=False)[0]
    got = ours.decode(latents / ours.scaling_factor)
    diff = _max_diff(got, want)
    print(f"vae decode: max abs diff {diff:.2e} (|out| max {want.abs().max():.2f}, shape {tuple(got.shape)})")
    assert diff <= ATOL and ours.scaling_factor == theirs.config.scaling_factor == 0.18215


@torch.no_grad()
def test_tiny_clip_text_equals_transformers(tiny_pairs) -> None:
    theirs, ours = tiny_pairs["te"]
    ids = torch.randint(0, 49406, (2, 77), generator=torch.Generator().manual_seed(3))
    ids[:, 0], ids[1, 9:] = 49406, 49407  # BOS, then EOS padding on the second prompt
    want = theirs(ids, return_dict=False)[0]
    got = ours(ids)
    diff = _max_diff(got, want)
    print(f"clip text: max abs diff {diff:.2e} (|out| max {want.abs().max():.2f})")
    assert diff <= ATOL


def test_sd15_state_dict_keys_and_shapes_equal() -> None:
    with torch.device("meta"):
        unet, vae, te = _oracles(nets.SD15)
        our_unet, our_vae, our_te = _ours(nets.SD15)
    pairs = ((our_unet, unet.state_dict()), (our_vae, _vae_subset(vae.state_dict())),
             (our_te, _clip_checkpoint_keys(te.state_dict())))
    for ours, theirs in pairs:
        assert _shapes(ours.state_dict()) == _shapes(theirs)
        assert list(ours.state_dict()) == list(theirs)  # in the same order too
    assert sum(p.numel() for p in our_unet.parameters()) == 859_520_964


def test_scheduler_config_is_facetrons_dpmsolver() -> None:
    merged = {k: v for k, v in {**SD15_SCHEDULER, **SCHEDULER_SETTINGS["dpmsolver"]}.items() if k != "clip_sample"}
    assert nets.SCHEDULER == merged


@pytest.mark.parametrize("karras", [True, False])
@pytest.mark.parametrize("steps", [25, 10])
def test_scheduler_equals_diffusers(steps: int, karras: bool) -> None:
    config = dict(nets.SCHEDULER, use_karras_sigmas=karras)
    # facetron's own scheduler (Karras sigmas); plain diffusers for the variant without
    theirs = make_scheduler("dpmsolver", SD15_SCHEDULER) if karras else DPMSolverMultistepScheduler(**config)
    assert theirs.config.use_karras_sigmas == karras
    ours = nets.DPMSolverMultistepScheduler(**config)
    theirs.set_timesteps(steps)
    ours.set_timesteps(steps)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    assert torch.equal(ours.sigmas, theirs.sigmas.float())
    assert ours.init_noise_sigma == theirs.init_noise_sigma == 1.0

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # a fixed fake model
        return 0.1 * x + math.sin(float(t))

    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    a = b = x0
    for t in theirs.timesteps:
        a = theirs.step(eps(theirs.scale_model_input(a, t), t), t, a, return_dict=False)[0]
    for t in ours.timesteps:
        b = ours.step(eps(ours.scale_model_input(b, t), t), t, b)
    rel = ((a - b).abs().max() / a.abs().max()).item()
    print(f"scheduler {steps} steps karras={karras}: max rel diff {rel:.2e}")
    assert rel <= 1e-5 and not torch.equal(a, x0)
