"""The tiny autoencoder (diffusers' ``AutoencoderTiny``, TAESD) beside the full VAE, chosen per request.

No TAESD weights ship: every test uses a small RANDOM ``AutoencoderTiny``
(:func:`facetron.export.tiny_vae.write_random_tiny_vae`) on the tiny default
base model. The oracle is diffusers: ``StableDiffusionPipeline(vae=AutoencoderTiny)``
(txt2img), ``StableDiffusionInpaintPipeline`` (template mode) and
``StableDiffusionImg2ImgPipeline`` (diffusers encoding the template itself)
with the same tiny autoencoder, against
facetron's served nets (the session repository, tests/conftest.py: assembled
with the same random autoencoder, conftest's ``tiny_vae_dir``) run in ONNX
Runtime through :func:`facetron.pipeline.generation.generate`; and once through
the session's Triton.
Tolerances: those of ``tests/test_diffusers_parity.py`` (max 2/255 per pixel)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from facetron import contract
from facetron.diffusion.base_model import load_base_model
from facetron.diffusion.lora_inputs import read_lora_manifest, zero_lora_inputs
from facetron.diffusion.nets import DiffusionNets
from facetron.diffusion.sampler import denoise
from facetron.errors import InvalidInputError
from facetron.export.diffusion_source import DiffusionSource
from facetron.export.tiny_vae import load_tiny_vae, write_random_tiny_vae
from facetron.pipeline.generation import generate
from facetron.pipeline.job import build_job
from facetron.request import GeneratorRequest, PortraitRequest
from facetron.users import UserRegistry
from test_diffusers_parity import (N, NEGATIVE, PROMPT, SEED, SIZE, STEPS, GUIDANCE, assert_close, assert_differs,
                                   diffusers_images, diffusers_pipe, pixels, request, template, template_image)
from onnx_nets import onnx_nets  # noqa: E402
from user_tokens import grant  # noqa: E402

TINY, FULL = contract.VAE_MODELS["tiny"], contract.VAE_MODELS["full"]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def base():
    return load_base_model()


@pytest.fixture(scope="module")
def tiny(base, tiny_vae_dir):
    """The session repository's tiny autoencoder (conftest's random one) in diffusers: the oracle's."""
    return load_tiny_vae(tiny_vae_dir, base)


@pytest.fixture(scope="module")
def exported(repository_graphs) -> dict:
    """The session repository's served nets (assembled with --tiny-vae), one ORT session each."""
    names = ("text_encoder", "unet") + tuple(c.name for c in FULL + TINY)
    return {"sessions": {n: repository_graphs[n] for n in names}, "graphs": repository_graphs,
            "unet_lora": zero_lora_inputs(read_lora_manifest(repository_graphs.folder("unet"))),
            "te_lora": zero_lora_inputs(read_lora_manifest(repository_graphs.folder("text_encoder")))}


@pytest.fixture(scope="module")
def tiny_source(tiny_vae_dir, tmp_path_factory) -> DiffusionSource:
    """A source with the tiny autoencoder, exported (what the runtime choice measures; the session repository's
    export folder is gone once it is assembled)."""
    source = DiffusionSource(tiny_vae=tiny_vae_dir)
    source.export(tmp_path_factory.mktemp("tiny_export"))
    return source


def served_nets(base, exported: dict, vae: str) -> DiffusionNets:
    """facetron's in-process nets (the served graphs; the base model: zero LoRA inputs) with the ``vae``'s
    autoencoder models (contract.VAE_MODELS)."""
    return onnx_nets(base, exported["sessions"], te_lora=exported["te_lora"], unet_lora=exported["unet_lora"],
                     vae=vae)


def tiny_pipe(base, tiny) -> StableDiffusionPipeline:
    """diffusers' pipeline with the tiny autoencoder as its VAE (everything else diffusers_pipe's)."""
    pipe = StableDiffusionPipeline(**{**diffusers_pipe(base).components, "vae": tiny})
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------- the request's choice


def test_the_vae_input_is_checked_by_the_request() -> None:
    assert GeneratorRequest().vae is None and GeneratorRequest(vae="tiny").vae == "tiny"
    assert "vae" in contract.PORTRAIT_GENERATOR.input_names() and "vae" in contract.PORTRAIT.input_names()
    assert "vae" in contract.PORTRAIT_STREAM.input_names()
    wire = GeneratorRequest(vae="tiny").to_arrays()
    assert GeneratorRequest.from_arrays(wire).vae == "tiny"
    for bad in ("TINY", "taesd", ""):
        with pytest.raises(InvalidInputError, match="vae") as err:
            GeneratorRequest(vae=bad)
        assert err.value.input_name == "vae" and "full, tiny" in err.value.rule
    with pytest.raises(InvalidInputError, match="vae"):
        PortraitRequest(user_id="someone", vae="small")


def test_tiny_on_a_repository_without_it_is_refused(tmp_path) -> None:
    """The job resolves the choice against the repository (model_info.json's tiny_vae): full is the default."""
    registry = UserRegistry(tmp_path / "users")
    info = {"resolution": SIZE, "latent_factor": 8}
    assert build_job(GeneratorRequest(), info, registry).vae == "full"
    with pytest.raises(InvalidInputError) as err:
        build_job(GeneratorRequest(vae="tiny"), {**info, "tiny_vae": None}, registry)
    assert err.value.input_name == "vae"
    assert "this repository has no tiny autoencoder (export repository --tiny-vae DIR)" in err.value.rule
    assert build_job(GeneratorRequest(vae="tiny"), {**info, "tiny_vae": {"class": "AutoencoderTiny"}}, registry).vae == "tiny"
    assert build_job(GeneratorRequest(vae="full"), {**info, "tiny_vae": {"class": "AutoencoderTiny"}}, registry).vae == "full"


# ----------------------------------------------------------------------------- the weights: checked, refused


def test_a_tiny_vae_of_another_latent_space_is_refused(base, tmp_path) -> None:
    """16 latent channels (TAESD3 / TAEF1's), another scale per latent cell, a full VAE or no config: a clear
    error naming --tiny-vae, before anything is exported."""
    from facetron.export.repository import assemble_repository

    cases = {
        "channels": (write_random_tiny_vae(tmp_path / "c16", latent_channels=16), "16 channels"),
        "factor": (write_random_tiny_vae(tmp_path / "f16", channels=4, encoder_block_out_channels=(4,) * 5,
                                         num_encoder_blocks=(1,) * 5), "16 / 8 px"),
        "class": (base.path / "vae", "not a diffusers AutoencoderTiny"),
        "empty": (tmp_path, "has no config.json"),
    }
    for what, (folder, rule) in cases.items():
        with pytest.raises(InvalidInputError) as err:
            load_tiny_vae(folder, base)
        assert err.value.input_name == "--tiny-vae" and rule in err.value.rule, (what, err.value.rule)
    with pytest.raises(InvalidInputError, match="16 channels"):
        assemble_repository("cpu", tmp_path / "repo", diffusion=DiffusionSource(tiny_vae=cases["channels"][0]))
    assert not (tmp_path / "repo").exists()


def test_cli_flags(tmp_path, capsys) -> None:
    from facetron.cli import main

    assert main(["export", "repository", "--faces-only", "--tiny-vae", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "--tiny-vae" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--user", "u", "--out", str(tmp_path / "o"), "--vae", "small"])
    assert "--vae" in capsys.readouterr().err


# ----------------------------------------------------------------------------- equal to diffusers, in process


def test_the_exported_graphs_are_the_tiny_autoencoder(tiny, exported, tiny_vae_dir) -> None:
    """vae_decoder_tiny: diffusers' decode of latent / scaling_factor, rounded like the full decoder's;
    vae_encoder_tiny: diffusers' encode (deterministic) x scaling_factor."""
    s = exported["sessions"]
    rng = np.random.default_rng(0)
    latent = rng.standard_normal((2, 4, 16, 24)).astype(np.float32)
    with torch.no_grad():
        x = tiny.decode(torch.from_numpy(latent) / tiny.config.scaling_factor).sample
    want = ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    got = s[TINY[0].name].run(None, {"latent": latent})[0]
    assert got.shape == (2, 128, 192, 3) and np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert want.std() > 10  # the random autoencoder's pictures are not flat
    image = template_image()
    with torch.no_grad():
        ref = tiny.encode(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1).latents
    got = s[TINY[1].name].run(None, {"images": image[None]})[0]
    assert got.shape == (1, 4, SIZE // 8, SIZE // 8)
    np.testing.assert_allclose(got, ref.numpy() * tiny.config.scaling_factor, atol=1e-4, rtol=1e-4)
    assert DiffusionSource(tiny_vae=tiny_vae_dir).nets[-2:] == tuple(c.name for c in TINY)
    graphs = exported["graphs"]
    assert json.loads((graphs.folder(TINY[0].name) / "io.json").read_text())["inputs"] == \
        json.loads((graphs.folder(FULL[0].name) / "io.json").read_text())["inputs"]


@pytest.mark.parametrize("scheduler", ["dpmsolver", "euler"])
def test_txt2img_with_the_tiny_vae_equals_diffusers(base, tiny, exported, scheduler) -> None:
    req = request(scheduler)
    got = generate(served_nets(base, exported, "tiny"), dict(base.scheduler.config), PROMPT, NEGATIVE, req)
    want = diffusers_images(tiny_pipe(base, tiny), scheduler)
    assert_close(got, want, f"txt2img tiny vae {scheduler}")
    full = generate(served_nets(base, exported, "full"), dict(base.scheduler.config), PROMPT, NEGATIVE, req)
    assert_close(full, diffusers_images(diffusers_pipe(base), scheduler), f"txt2img full vae {scheduler}")
    assert_differs(got, full, "the tiny autoencoder decodes, not the full VAE")


def tiny_latent(tiny, image: np.ndarray) -> torch.Tensor:
    """diffusers' AutoencoderTiny latents x scaling factor of a uint8 picture (what its pipelines encode)."""
    with torch.no_grad():
        return tiny.encode(pixels(image)).latents * tiny.config.scaling_factor


@pytest.mark.parametrize("scheduler, steps, strength", [("dpmsolver", 8, 0.6), ("euler", 4, 1.0)])
def test_template_mode_with_the_tiny_vae_equals_inpaint_pipeline(base, tiny, exported, scheduler, steps,
                                                                   strength) -> None:
    """Template mode as served (tests/test_diffusers_parity.py's structure): ``generate`` with a template over
    the served vae_encoder_tiny / vae_decoder_tiny (the mask at latent size, the known region blended back
    after every step) equals StableDiffusionInpaintPipeline with the same AutoencoderTiny, given diffusers'
    own tiny latent of the template as a 4-channel ``image``."""
    nets = served_nets(base, exported, "tiny")
    prepared = template()
    latent = tiny_latent(tiny, prepared.image)
    req = request(scheduler, steps=steps, strength=strength)
    got = generate(nets, dict(base.scheduler.config), PROMPT, NEGATIVE, req, template=prepared)
    want = diffusers_images(tiny_pipe(base, tiny), scheduler, steps=steps, template_latent=latent, mask=prepared.mask,
                            strength=strength)
    assert_close(got, want, f"template (inpaint) tiny vae {scheduler} steps={steps} strength={strength}")
    full = generate(served_nets(base, exported, "full"), dict(base.scheduler.config), PROMPT, NEGATIVE, req,
                    template=prepared)
    assert_differs(got, full, "the tiny autoencoder encodes and decodes the template")


def test_template_latent_with_the_tiny_vae_equals_img2img(base, tiny, exported) -> None:
    """The encoder on its own oracle: ``denoise`` from the served vae_encoder_tiny's latent (no mask) equals
    diffusers' img2img given the template's *pixels*, which it encodes itself with the same AutoencoderTiny
    (deterministic: no latent distribution to sample)."""
    nets = served_nets(base, exported, "tiny")
    image = template_image()
    init = nets.vae_encode(image[None])
    hidden = nets.text_encode(nets.tokenize([PROMPT, NEGATIVE]))
    scheduler, steps, strength = "ddim", 6, 0.5
    req = request(scheduler, steps=steps, strength=strength)
    got = nets.vae_decode(denoise(nets.unet, dict(base.scheduler.config), hidden[:1], hidden[1:], req,
                                  nets.latent_channels, nets.latent_factor, init_latents=init))
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255  # diffusers' [0, 1] tensor input
    want = diffusers_images(tiny_pipe(base, tiny), scheduler, steps=steps, template_latent=pixels, strength=strength,
                            guidance=GUIDANCE)
    assert_close(got, want, f"template tiny vae {scheduler} steps={steps} strength={strength}")


def test_the_runtime_choice_measures_the_tiny_nets(tiny_source, monkeypatch) -> None:
    """``--cpu-runtime auto`` measures the tiny autoencoder's nets like the full VAEs' (their torch oracle:
    the AutoencoderTiny graphs; bf16 measured as on a CPU with bf16 kernels)."""
    from facetron.export import runtime_choice

    monkeypatch.setattr(runtime_choice, "bf16_fast", lambda: ["avx512_bf16"])
    names = tuple(c.name for c in TINY)
    report = tiny_source.choose_runtimes("auto", repeats=1, budget_s=0.01, nets=names)
    assert set(report) == set(names)
    for name, entry in report.items():
        assert entry["runtime"] in contract.NET_RUNTIMES and entry["runtimes"]["onnxruntime"]["eligible"], name
        assert entry["torch_bf16_rel_l2"] >= 0, name


# ----------------------------------------------------------------------------- served by Triton


@pytest.fixture(scope="module")
def tiny_user(users_dir, tmp_path_factory) -> str:
    """A user of the session registry with a random face LoRA."""
    from facetron.training.random_lora import write_random_lora

    registry = UserRegistry(users_dir)
    registry.save_reference_embedding("tiny-vae-user", np.ones((1, 128), np.float32))
    grant(registry, "tiny-vae-user")
    registry.install_lora("tiny-vae-user", write_random_lora(tmp_path_factory.mktemp("tiny_user") / "u.safetensors",
                                                             load_base_model().unet, rank=4, alpha=8, seed=31, std=0.1))
    return "tiny-vae-user"


@pytest.mark.triton
def test_served_tiny_vae_equals_diffusers_and_is_reported(base, tiny, triton, full_repository, tiny_user) -> None:
    """Two calls: portrait_generator with vae=tiny equals diffusers' pipeline with the AutoencoderTiny;
    portrait with vae=tiny reports the autoencoder that decoded."""
    from facetron.client import FacetronClient

    server, repo = triton, full_repository
    for name in (c.name for c in TINY):  # written like the full VAEs: code, graph, the same runtime parameters
        assert (repo / name / "1" / "model.py").is_file() and (repo / name / "1" / contract.MODEL_FILE).is_file()
    info = json.loads((repo / "portrait_generator" / "1" / contract.MODEL_INFO).read_text())
    assert info["tiny_vae"]["class"] == "AutoencoderTiny" and info["tiny_vae"]["scaling_factor"] == 1.0
    scheduler = "euler"
    inputs = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "scheduler": scheduler, "vae": "tiny"}
    req = {k: np.array([v.encode()], dtype=object) for k, v in inputs.items()}
    req.update(num_images=np.array([N], np.int32), steps=np.array([STEPS], np.int32),
               seed=np.array([SEED], np.int64), guidance=np.array([GUIDANCE], np.float32))
    with FacetronClient(server.grpc_url, timeout_s=300) as client:
        served = client.infer("portrait_generator", req, ["images"])["images"]
        assert_close(served, diffusers_images(tiny_pipe(base, tiny), scheduler), f"served tiny vae {scheduler}")
        result = client.portrait(tiny_user, vae="tiny", fuse=False, num_images=1, steps=2, seed=SEED)
    assert result.report["vae"] == "tiny"

