"""Template mode with a ControlNet (issue 22, items 2-3), equal to diffusers.

No ControlNet weights ship: every test uses a small RANDOM ``ControlNetModel``
matching the tiny default UNet (:func:`facetron.export.controlnet.write_random_controlnet`;
its zero convolutions are random too, so its residuals change the pictures).
The oracle is diffusers' ``StableDiffusionControlNetInpaintPipeline`` (the
4-channel UNet branch: the known region noised to each step and blended back,
the ControlNet run on the step's UNet input, ``guess_mode=False``, the
control image duplicated for the guidance halves) with the same tiny
components, per-image generators, the same strength and scale, and as
``control_image`` the template's canny edges made as diffusers' ControlNet
examples make them (``cv2.Canny(image, 100, 200)``, 3 channels, PIL). facetron
runs the served graphs (:class:`DiffusionSource` with ``controlnet``: the
``controlnet`` graph and the runtime-LoRA ``unet``'s control graph) in ONNX
Runtime through :func:`facetron.pipeline.generation.generate`, and once
through Triton: the session repository (tests/conftest.py) is assembled with
the same random ControlNet (conftest's ``controlnet_dir``), its graphs are
the ones run in process here.

One deliberate difference, as in ``tests/test_diffusers_parity.py``:
facetron's ``vae_encoder`` gives the latent *mean*; diffusers' ControlNet
inpaint pipeline takes the template as pixels (it refuses a latent ``image``:
its masked image is pixels x a pixel mask) and encodes it itself, *sampling*
the latent distribution. Its VAE here is the same VAE whose ``encode``
returns the mean as ``latents`` (what ``retrieve_latents`` takes as they
are): the same latent, no generator drawn. Tolerances: max 2/255 per pixel,
mean 0.01/255 (``test_diffusers_parity``)."""

from __future__ import annotations

import copy
import json

import cv2
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionControlNetInpaintPipeline
from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTinyOutput
from PIL import Image

from facetron import contract
from facetron.diffusion.base_model import load_base_model
from facetron.diffusion.lora_inputs import lora_inputs_for, read_lora_manifest, zero_lora_inputs
from facetron.diffusion.nets import DiffusionNets
from facetron.diffusion.sampler import SCHEDULER_SETTINGS, GenerationRequest
from facetron.errors import InvalidInputError
from facetron.export.controlnet import load_controlnet, residual_layout, write_random_controlnet
from facetron.export.diffusion_source import DiffusionSource
from facetron.pipeline.control import canny_edges, control_image
from facetron.pipeline.generation import generate
from facetron.pipeline.job import build_job
from facetron.request import GeneratorRequest, PortraitRequest
from facetron.users import UserRegistry
from facetron.pipeline.template import PreparedTemplate
from test_diffusers_parity import (GUIDANCE, N, NEGATIVE, PROMPT, SCHEDULERS, SEED, SIZE, TEMPLATE_LANDMARKS, W_FACE,
                                   W_STYLE, assert_close, assert_differs, diffusers_pipe, template_image)
from test_diffusers_parity import loras  # noqa: F401  (the LoRA files fixture)
from onnx_nets import onnx_nets  # noqa: E402
from user_tokens import grant  # noqa: E402


# ----------------------------------------------------------------------------- fixtures


def edged_image() -> np.ndarray:
    """test_diffusers_parity's smooth picture (no edge at canny's thresholds) with hard-edged shapes drawn on it:
    a face-like ellipse, eyes, a mouth, a collar, a frame."""
    image = np.ascontiguousarray(template_image())
    cv2.ellipse(image, (64, 70), (26, 34), 0, 0, 360, (230, 200, 170), -1)
    for x in (48, 80):
        cv2.circle(image, (x, 54), 5, (20, 20, 20), -1)
    cv2.line(image, (52, 86), (76, 86), (150, 20, 20), 3)
    cv2.rectangle(image, (30, 108), (98, 127), (10, 40, 120), -1)
    cv2.rectangle(image, (4, 4), (123, 123), (255, 255, 255), 2)
    return image


def template() -> PreparedTemplate:
    """edged_image() with its face at test_diffusers_parity's TEMPLATE_LANDMARKS and the masks built from them."""
    return PreparedTemplate.of(edged_image(), TEMPLATE_LANDMARKS)



@pytest.fixture(scope="module")
def base():
    return load_base_model()


@pytest.fixture(scope="module")
def controlnet(base, controlnet_dir):
    """The session repository's ControlNet (conftest's random one) in diffusers: the oracle's."""
    return load_controlnet(controlnet_dir, base)


@pytest.fixture(scope="module")
def exported(repository_graphs) -> dict:
    """The session repository's served nets (assembled with --controlnet), one ORT session each; ``layout``: the
    controlnet's residual layout file."""
    graphs = {n: n for n in ("text_encoder", "unet", "vae_decoder", "vae_encoder", "controlnet")}
    graphs["unet_control"] = f"unet/{contract.CONTROL_FOLDER}"
    return {"sessions": {n: repository_graphs[g] for n, g in graphs.items()},
            "layout": repository_graphs.folder("controlnet") / contract.CONTROL_LAYOUT,
            "manifest": read_lora_manifest(repository_graphs.folder(graphs["unet_control"])),
            "te_lora": zero_lora_inputs(read_lora_manifest(repository_graphs.folder("text_encoder")))}


def served_nets(base, exported: dict, lora: dict[str, np.ndarray] | None = None) -> DiffusionNets:
    """facetron's in-process nets: the served graphs in ONNX Runtime, the UNets fed one item's LoRA inputs
    (``lora``; None = zero = the base model) per batch item, the ControlNet and the unet's control graph."""
    return onnx_nets(base, exported["sessions"], te_lora=exported["te_lora"], control=("controlnet", "unet_control"),
                     unet_lora=lora if lora is not None else zero_lora_inputs(exported["manifest"]))


def mean_vae(vae):
    """A copy of ``vae`` whose ``encode`` gives its latent distribution's mean as ``latents`` (diffusers'
    ``retrieve_latents`` takes those as they are, drawing nothing from the generators), as facetron's encoder."""
    vae = copy.deepcopy(vae)
    encode = vae.encode
    vae.encode = lambda x, return_dict=True: AutoencoderTinyOutput(latents=encode(x).latent_dist.mean)
    return vae


def diffusers_canny(image: np.ndarray) -> Image.Image:
    """diffusers' ControlNet canny example: ``cv2.Canny(np.array(image), 100, 200)`` in 3 channels, as PIL."""
    edges = cv2.Canny(np.array(image), 100, 200)[:, :, None]
    return Image.fromarray(np.concatenate([edges, edges, edges], axis=2))


def diffusers_control_images(base, controlnet, scheduler: str, *, steps: int, strength: float, scale: float,
                             image: np.ndarray, mask: np.ndarray, loras=(), guidance: float = GUIDANCE,
                             seed: int = SEED, n: int = N) -> np.ndarray:
    """StableDiffusionControlNetInpaintPipeline over diffusers_pipe's components (``loras`` loaded by
    load_lora_weights + set_adapters) with the mean-encoding VAE: ``image`` the template (pixels), ``mask_image``
    its pixel mask, ``control_image`` its canny edges; as uint8 the way its output rounds."""
    parts = diffusers_pipe(base, list(loras)).components
    pipe = StableDiffusionControlNetInpaintPipeline(
        vae=mean_vae(base.vae), text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], unet=parts["unet"],
        controlnet=controlnet, scheduler=SCHEDULERS[scheduler].from_config(base.scheduler.config,
                                                                           **SCHEDULER_SETTINGS[scheduler]),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    with torch.no_grad():
        out = pipe(PROMPT, image=Image.fromarray(image), mask_image=mask[..., None], control_image=diffusers_canny(image),
                   height=SIZE, width=SIZE, strength=strength, num_inference_steps=steps, guidance_scale=guidance,
                   negative_prompt=NEGATIVE, num_images_per_prompt=n, generator=generators, output_type="np",
                   controlnet_conditioning_scale=scale, guess_mode=False, eta=0.0).images
    return (out * 255).round().astype(np.uint8)


def control_request(scheduler: str, steps: int, strength: float, scale: float, control: str = "canny",
                    guidance: float = GUIDANCE) -> GenerationRequest:
    req = GenerationRequest(num_images=N, steps=steps, guidance=guidance, seed=SEED, height=SIZE, width=SIZE,
                            scheduler=scheduler, strength=strength, control=control, control_scale=scale)
    req.validate()
    return req


# ----------------------------------------------------------------------------- the graphs and the image


def test_the_conditioning_image_is_diffusers_canny() -> None:
    """controlnet_cond = diffusers' control_image_processor of the canny example's picture: [3, H, W] in [0, 1]."""
    from diffusers.image_processor import VaeImageProcessor

    assert not cv2.Canny(template_image(), 100, 200).any()  # the smooth picture alone has no edges: shapes added
    image = edged_image()
    want = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False).preprocess(
        diffusers_canny(image), height=SIZE, width=SIZE)[0].numpy()
    got = control_image("canny", image)
    assert got.dtype == np.float32 and got.shape == (3, SIZE, SIZE)
    np.testing.assert_array_equal(got, want)
    assert 0.02 < got.mean() < 0.5 and set(np.unique(got)) == {0.0, 1.0}  # a real edge map, not blank
    np.testing.assert_array_equal(canny_edges(image), np.array(diffusers_canny(image)))


def test_the_exported_graphs_are_the_controlnet_and_the_unet(base, controlnet, exported) -> None:
    """controlnet: diffusers' ControlNetModel x the per-item scale; the unet's control graph: the UNet's forward
    with down_block_additional_residuals / mid_block_additional_residual (base model: zero LoRA)."""
    s = exported["sessions"]
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 4, 16, 24)).astype(np.float32)
    t = np.array([901.0, 301.0], np.float32)
    hidden = rng.standard_normal((2, 77, 32)).astype(np.float32)
    cond = rng.random((2, 3, 128, 192), np.float32)
    scale = np.array([1.0, 0.4], np.float32)
    names = [o.name for o in s["controlnet"].get_outputs()]
    assert names == [f"down_block_residual_{i}" for i in range(len(residual_layout(base.unet)) - 1)] + \
        ["mid_block_residual"]
    got = s["controlnet"].run(None, {"sample": sample, "timestep": t, "encoder_hidden_states": hidden,
                                     "controlnet_cond": cond, "conditioning_scale": scale})
    with torch.no_grad():
        down, mid = controlnet(torch.from_numpy(sample), torch.from_numpy(t), torch.from_numpy(hidden),
                               torch.from_numpy(cond), return_dict=False)
    for g, w in zip(got, [*down, mid]):
        np.testing.assert_allclose(g, w.numpy() * scale[:, None, None, None], atol=1e-4, rtol=1e-4)
    feed = {"sample": sample, "timestep": t, "encoder_hidden_states": hidden, **dict(zip(names, got)),
            **{k: np.repeat(v, 2, 0) for k, v in zero_lora_inputs(exported["manifest"]).items()}}
    noise = s["unet_control"].run(None, feed)[0]
    with torch.no_grad():
        want = base.unet(torch.from_numpy(sample), torch.from_numpy(t), torch.from_numpy(hidden),
                         down_block_additional_residuals=[torch.from_numpy(g) for g in got[:-1]],
                         mid_block_additional_residual=torch.from_numpy(got[-1])).sample.numpy()
        plain = base.unet(torch.from_numpy(sample), torch.from_numpy(t), torch.from_numpy(hidden)).sample.numpy()
    np.testing.assert_allclose(noise, want, atol=1e-4, rtol=1e-4)
    assert np.abs(want - plain).mean() > 0.05 * np.abs(plain).mean()  # the residuals change the prediction
    layout = json.loads(exported["layout"].read_text())
    assert [r["name"] for r in layout["residuals"]] == names and layout["cond_factor"] == base.latent_factor


# ----------------------------------------------------------------------------- equal to diffusers, in process

# (scheduler, steps, strength, control_scale)
CONTROL_CASES = [("dpmsolver", 8, 0.6, 1.0), ("euler", 6, 1.0, 0.7), ("ddim", 6, 0.5, 1.5)]


@pytest.mark.parametrize("scheduler, steps, strength, scale", CONTROL_CASES,
                         ids=[f"{s}-{st}steps-strength{x}-scale{c}" for s, st, x, c in CONTROL_CASES])
def test_template_mode_with_controlnet_equals_diffusers(base, controlnet, exported, scheduler, steps, strength,
                                                        scale) -> None:
    prepared = template()
    req = control_request(scheduler, steps, strength, scale)
    got = generate(served_nets(base, exported), dict(base.scheduler.config), PROMPT, NEGATIVE, req, template=prepared)
    want = diffusers_control_images(base, controlnet, scheduler, steps=steps, strength=strength, scale=scale,
                                    image=prepared.image, mask=prepared.mask)
    assert_close(got, want, f"controlnet template {scheduler} steps={steps} strength={strength} scale={scale}")


def test_template_mode_with_controlnet_and_lora_equals_diffusers(base, controlnet, exported, loras) -> None:
    """The user's face LoRA + a style LoRA ride on the unet's control graph (runtime LoRA inputs); diffusers
    loads them with load_lora_weights + set_adapters into the UNet (the ControlNet takes no LoRA)."""
    prepared = template()
    inputs = lora_inputs_for(loras["face"], exported["manifest"], W_FACE, extra=[(loras["style"], W_STYLE)])
    req = control_request("euler", 6, 0.7, 1.0)
    got = generate(served_nets(base, exported, inputs), dict(base.scheduler.config), PROMPT, NEGATIVE, req,
                   template=prepared)
    want = diffusers_control_images(base, controlnet, "euler", steps=6, strength=0.7, scale=1.0, image=prepared.image,
                                    mask=prepared.mask, loras=[(loras["face"], W_FACE), (loras["style"], W_STYLE)])
    assert_close(got, want, "controlnet template, runtime LoRA face+style euler")
    plain = generate(served_nets(base, exported), dict(base.scheduler.config), PROMPT, NEGATIVE, req, template=prepared)
    assert_differs(got, plain, "the LoRAs with a ControlNet")


def test_control_scale_zero_is_no_controlnet_and_one_is_not(base, exported) -> None:
    """At scale 0 every residual is 0: the pictures are those of template mode without a ControlNet (the
    control graph adds zeros; ONNX Runtime's two graphs may differ in the last float bit, so within the
    parity tolerance); at 1 they differ by far more."""
    prepared, nets, sched = template(), served_nets(base, exported), dict(base.scheduler.config)
    plain = generate(nets, sched, PROMPT, NEGATIVE, control_request("dpmsolver", 8, 0.6, 1.0, control="none"),
                     template=prepared)
    zero = generate(nets, sched, PROMPT, NEGATIVE, control_request("dpmsolver", 8, 0.6, 0.0), template=prepared)
    one = generate(nets, sched, PROMPT, NEGATIVE, control_request("dpmsolver", 8, 0.6, 1.0), template=prepared)
    assert_close(zero, plain, "control_scale 0 vs no ControlNet")
    assert_differs(one, plain, "control_scale 1")


# ----------------------------------------------------------------------------- the request's choice


def test_control_inputs_are_checked_by_the_request() -> None:
    """control / control_scale: in the generation inputs of every generating model, parsed from the wire,
    each rule naming its input (control only with a template, the scale in [0, 2] and only with a control)."""
    image = edged_image()
    for model in (contract.PORTRAIT_GENERATOR, contract.PORTRAIT, contract.PORTRAIT_STREAM):
        assert {"control", "control_scale"} <= set(model.input_names()), model.name
    req = GeneratorRequest(template=image, control="canny", control_scale=0.5)
    back = GeneratorRequest.from_arrays(req.to_arrays())
    assert (back.control, back.control_scale) == ("canny", 0.5)
    assert GeneratorRequest(control="none").control == "none"  # none needs no template
    bad = [(dict(template=image, control="pose"), "control", "expected one of none, canny"),
           (dict(control="canny"), "control", "template mode only"),
           (dict(template=image, control="canny", control_scale=2.5), "control_scale", "[0, 2]"),
           (dict(template=image, control="canny", control_scale=-0.1), "control_scale", "[0, 2]"),
           (dict(template=image, control="canny", control_scale=float("nan")), "control_scale", "[0, 2]"),
           (dict(template=image, control_scale=1.0), "control_scale", "only applies with a control")]
    for kwargs, name, rule in bad:
        with pytest.raises(InvalidInputError) as err:
            GeneratorRequest(**kwargs)
        assert err.value.input_name == name and rule in err.value.rule, (kwargs, err.value)
    with pytest.raises(InvalidInputError, match="control"):
        PortraitRequest(user_id="someone", control="canny")


def test_the_job_records_the_control_and_refuses_it_where_not_served(tmp_path) -> None:
    registry = UserRegistry(tmp_path / "users")
    info = {"resolution": SIZE, "latent_factor": 8, "controlnet": {"residuals": ["down_block_residual_0"]}}
    request = GeneratorRequest(template=edged_image(), control="canny", control_scale=0.8)
    assert build_job(request, info, registry).control == ("canny", pytest.approx(0.8))
    assert build_job(GeneratorRequest(template=edged_image()), info, registry).control == ("none", 1.0)
    assert build_job(GeneratorRequest(template=edged_image(), control="canny"), info, registry).control == ("canny", 1.0)
    with pytest.raises(InvalidInputError) as err:
        build_job(request, {**info, "controlnet": None}, registry)
    assert err.value.input_name == "control" and "export repository --controlnet DIR" in err.value.rule


def test_generate_refuses_control_it_cannot_run(base, exported) -> None:
    nets, sched = served_nets(base, exported), dict(base.scheduler.config)
    with pytest.raises(InvalidInputError, match="control: only applies in template mode"):
        generate(nets, sched, PROMPT, NEGATIVE, control_request("euler", 4, 1.0, 1.0))
    cached = GenerationRequest(num_images=1, steps=4, height=SIZE, width=SIZE, strength=0.5, cache_interval=2,
                               control="canny")
    with pytest.raises(InvalidInputError, match="cache_interval: step caching has no ControlNet graphs"):
        generate(nets, sched, PROMPT, NEGATIVE, cached, template=template())
    nets.controlnet = None  # merged mode / a repository without one
    with pytest.raises(InvalidInputError, match="control: this deployment serves no ControlNet"):
        generate(nets, sched, PROMPT, NEGATIVE, control_request("euler", 4, 1.0, 1.0), template=template())


def test_cli_flags(tmp_path, capsys) -> None:
    from facetron.cli import main

    assert main(["export", "repository", "--faces-only", "--controlnet", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "--controlnet" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--user", "u", "--out", str(tmp_path / "o"), "--control", "pose"])
    assert "--control" in capsys.readouterr().err
    template_file = tmp_path / "t.png"
    Image.fromarray(edged_image()).save(template_file)
    for args, flag in ((["--control", "canny"], "--control"),
                       (["--template", str(template_file), "--control", "canny", "--control-scale", "2.5"],
                        "--control-scale"), (["--template", str(template_file), "--control-scale", "1"], "--control-scale")):
        assert main(["generate", "--user", "u", "--out", str(tmp_path / "o"), *args]) == 2
        assert capsys.readouterr().err.startswith(f"facetron generate: error: {flag}:"), args
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- the weights: checked, refused


def test_a_controlnet_of_another_model_is_refused(base, tmp_path) -> None:
    """Other blocks (SD-1.5's), another conditioning scale, a UNet folder, no config: a clear error naming
    --controlnet, before anything is exported."""
    from facetron.diffusion.model_spec import TINY
    from facetron.export.repository import assemble_repository

    cases = {
        "blocks": (write_random_controlnet(tmp_path / "wide", unet_config={**TINY.unet, "block_out_channels": (32, 32)}),
                   "block_out_channels"),
        "factor": (write_random_controlnet(tmp_path / "f16", conditioning_channels=(8, 8, 8, 8, 8)), "16 px"),
        "class": (base.path / "unet", "not a diffusers ControlNetModel"),
        "empty": (tmp_path, "has no config.json"),
    }
    for what, (folder, rule) in cases.items():
        with pytest.raises(InvalidInputError) as err:
            load_controlnet(folder, base)
        assert err.value.input_name == "--controlnet" and rule in err.value.rule, (what, err.value.rule)
    with pytest.raises(InvalidInputError, match="block_out_channels"):
        assemble_repository("cpu", tmp_path / "repo", diffusion=DiffusionSource(controlnet=cases["blocks"][0]))
    assert not (tmp_path / "repo").exists()


def test_the_control_checks_name_their_input(exported) -> None:
    """The controlnet's own inputs and the unet's residuals, checked in process (the session server's controlnet
    gets the over-budget requests of tests/test_budgets.py and the malformed ones of test_bad_input_matrix.py)."""
    from facetron.pipeline.net_io import check_control_inputs, check_residuals

    sample = np.zeros((2, 4, 16, 16), np.float32)
    cond, scale = np.zeros((2, 3, 128, 128), np.float32), np.ones((2, 1), np.float32)
    assert check_control_inputs(cond, scale, sample, 8)[1].shape == (2,)
    for c, s, name in ((np.zeros((2, 3, 128, 120), np.float32), scale, "controlnet_cond"),
                       (cond + 2, scale, "controlnet_cond"), (cond, scale * 3, "conditioning_scale"),
                       (cond, scale[:1], "conditioning_scale"), (cond, None, "conditioning_scale")):
        with pytest.raises(InvalidInputError) as err:
            check_control_inputs(c, s, sample, 8)
        assert err.value.input_name == name
    layout = json.loads(exported["layout"].read_text())
    given = {r["name"]: np.zeros((2, r["channels"], 16 // r["factor"], 16 // r["factor"]), np.float32)
             for r in layout["residuals"]}
    assert list(check_residuals(given, sample, layout)) == list(given)
    wrong = {**given, "down_block_residual_0": np.zeros((2, 32, 8, 8), np.float32)}
    for feed, name in ((wrong, "down_block_residual_0"), ({k: v for k, v in given.items() if k != "mid_block_residual"},
                                                          "mid_block_residual"),
                       ({**given, "down_block_residual_11": given["down_block_residual_0"]}, "down_block_residual_11")):
        with pytest.raises(InvalidInputError) as err:
            check_residuals(feed, sample, layout)
        assert err.value.input_name == name


# ----------------------------------------------------------------------------- served by Triton


@pytest.fixture(scope="module")
def control_user(users_dir, tmp_path_factory) -> str:
    """A user of the session registry with a random face LoRA."""
    from facetron.training.random_lora import write_random_lora

    registry = UserRegistry(users_dir)
    registry.save_reference_embedding("control-user", np.ones((1, 128), np.float32))
    grant(registry, "control-user")
    registry.install_lora("control-user", write_random_lora(tmp_path_factory.mktemp("control_user") / "u.safetensors",
                                                            load_base_model().unet, rank=4, alpha=8, seed=31, std=0.1))
    return "control-user"


@pytest.mark.triton
def test_served_controlnet_equals_diffusers_and_is_reported(base, controlnet, triton, full_repository, control_user,
                                                            tmp_path) -> None:
    """portrait_generator with a template and control=canny (the template fitted, its face found by the served
    face_detector, its mask and canny image built on the server, controlnet then unet over BLS every step)
    equals StableDiffusionControlNetInpaintPipeline on the same fitted template and mask (the in-process
    detector's landmarks: the same ONNX detector); portrait reports the control that ran. (A stranger's direct
    calls to controlnet and to the unet's control graph: tests/test_bad_input_matrix.py, tests/test_budgets.py.)"""
    from facetron.client import FacetronClient
    from facetron.faces.detector import FaceDetector
    from facetron.pipeline.net_io import pack_detections
    from facetron.pipeline.template import prepare_template
    from facetron.training.demo_templates import demo_templates

    server, repo = triton, full_repository
    assert (repo / "controlnet" / "1" / contract.MODEL_FILE).is_file()
    assert (repo / "unet" / "1" / contract.CONTROL_FOLDER / contract.MODEL_FILE).is_file()
    info = json.loads((repo / "portrait_generator" / "1" / contract.MODEL_INFO).read_text())
    assert info["controlnet"]["class"] == "ControlNetModel" and len(info["controlnet"]["residuals"]) == 5
    choice = json.loads((repo / "runtime_choice.json").read_text())
    assert choice["runtimes"]["controlnet"] == choice["runtimes"]["unet"]

    detector = FaceDetector()
    _, photo = demo_templates(detector, size=SIZE, count=1)[0]
    prepared = prepare_template(photo, SIZE, SIZE, lambda images: pack_detections(detector.detect_batch(list(images))))
    assert canny_edges(prepared.image).any()
    scheduler, steps, strength, scale = "dpmsolver", 8, 0.7, 1.0
    inputs = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "scheduler": scheduler, "control": "canny"}
    req = {k: np.array([v.encode()], dtype=object) for k, v in inputs.items()}
    req.update(num_images=np.array([N], np.int32), steps=np.array([steps], np.int32), seed=np.array([SEED], np.int64),
               guidance=np.array([GUIDANCE], np.float32), height=np.array([SIZE], np.int32),
               width=np.array([SIZE], np.int32), template=photo, strength=np.array([strength], np.float32),
               control_scale=np.array([scale], np.float32))
    with FacetronClient(server.grpc_url, timeout_s=300) as client:
        served = client.infer("portrait_generator", req, ["images"])["images"]
        want = diffusers_control_images(base, controlnet, scheduler, steps=steps, strength=strength, scale=scale,
                                        image=prepared.image, mask=prepared.mask)
        assert_close(served, want, f"served controlnet template {scheduler} steps={steps} strength={strength}")
        result = client.portrait(control_user, template=photo, control="canny", control_scale=0.5, fuse=False,
                                 num_images=1, steps=2, seed=SEED, height=SIZE, width=SIZE)
        plain = client.portrait(control_user, template=photo, fuse=False, num_images=1, steps=2, seed=SEED,
                                height=SIZE, width=SIZE)
    control = result.report["template_mode"]["control"]
    assert control["control"] == "canny" and control["scale"] == 0.5
    assert plain.report["template_mode"]["control"] is None
    # the command: facetron generate --control canny --control-scale S
    from facetron.cli import main

    out = tmp_path / "cli"
    Image.fromarray(photo).save(tmp_path / "template.png")
    assert main(["generate", "--user", control_user, "--server", server.grpc_url, "--out", str(out), "--template",
                 str(tmp_path / "template.png"), "--control", "canny", "--control-scale", "1.5", "--num-images", "1",
                 "--steps", "2", "--fusion-strength", "0"]) == 0
    written = json.loads((out / "result.json").read_text())
    assert written["request"]["control"] == "canny" and written["request"]["control_scale"] == 1.5
    assert written["report"]["template_mode"]["control"]["scale"] == 1.5

