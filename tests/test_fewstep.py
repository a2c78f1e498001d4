"""The few-step path: a distillation LoRA the operator supplies (LCM-LoRA, TCD-LoRA, Hyper-SD; diffusers or
kohya keys) merged into the served ``unet_fewstep``, users' LoRAs stacked on it at run time.

No distillation weights ship: every test uses a tiny RANDOM "distillation" LoRA
on the tiny default base model, covering the layer kinds a real SD-1.5 LCM-LoRA
covers (diffusers' ``train_lcm_distill_lora_sd_wds.py`` target modules:
attention q/k/v/out, proj_in/out, the feed-forwards, the resnets' conv1 / conv2 /
conv_shortcut / time_emb_proj, the down/up samplers' convs; 79 layers here),
written as diffusers' LCM training script saves it (peft names under ``unet.``,
the adapter config in the header) and in kohya's layout (``lora_unet_*`` +
``.alpha``, LCM-LoRA's published file), made once per session (conftest's
``distill_lora``): the session repository is assembled from the kohya copy.

The oracle is diffusers: ``StableDiffusionPipeline`` with ``LCMScheduler`` /
``TCDScheduler``, ``load_lora_weights(distill, adapter_name=...)``,
``load_lora_weights(face, ...)``, ``set_adapters([distill, face], [w_distill,
w_face])``, against facetron's served graphs (from the assembled repository)
run in ONNX Runtime through :func:`facetron.pipeline.generation.generate`, and
once through the session's Triton. Tolerances: ``tests/test_diffusers_parity.py``'s (max
2/255 per pixel, mean 0.01).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from facetron import contract
from facetron.contract import GeneratorParams
from facetron.diffusion.base_model import load_base_model
from facetron.diffusion.lora_inputs import lora_inputs_for, read_lora_manifest, zero_lora_inputs
from facetron.diffusion.nets import DiffusionNets
from facetron.errors import InvalidInputError
from facetron.export.diffusion_source import DiffusionSource
from facetron.export.distill_lora import fewstep_unet, layer_kind, load_distill_lora
from facetron.pipeline.generation import generate
from facetron.pipeline.job import build_job, unet_model
from facetron.request import GeneratorRequest
from facetron.training.random_lora import write_random_lora
from facetron.users import UserRegistry
from test_diffusers_parity import (N, NEGATIVE, PROMPT, SEED, STEPS, GUIDANCE, assert_close, assert_differs,
                                   diffusers_images, diffusers_pipe, request)
from onnx_nets import onnx_nets  # noqa: E402
from user_tokens import grant  # noqa: E402

W_FACE = contract.DEFAULT_W_FACE
USER = "fewstep-user"
FEWSTEP, PLAIN = contract.UNET_FEWSTEP.name, contract.UNET.name


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def base():
    return load_base_model()


@pytest.fixture(scope="module")
def loras(base, distill_lora, tmp_path_factory) -> dict[str, Path]:
    """The session repository's distillation LoRA (conftest: both layouts) + a face LoRA and one with text-encoder
    layers."""
    d = tmp_path_factory.mktemp("fewstep_loras")
    return {
        "distill": distill_lora.peft,
        "distill_kohya": distill_lora.kohya,
        "face": write_random_lora(d / "face.safetensors", base.unet, rank=4, alpha=8, seed=31, std=0.1),
        "with_te": write_random_lora(d / "with_te.safetensors", base.unet, rank=4, alpha=4, seed=42, std=0.05,
                                     text_encoder=base.text_encoder),
    }


@pytest.fixture(scope="module")
def users(loras, users_dir) -> Path:
    """USER in the session registry, with the face LoRA."""
    registry = UserRegistry(users_dir)
    registry.save_reference_embedding(USER, np.ones((1, 128), np.float32))
    grant(registry, USER)
    registry.install_lora(USER, loras["face"])
    return users_dir


@pytest.fixture(scope="module")
def repo(full_repository) -> Path:
    """The session repository: assembled with the distillation LoRA (its kohya copy, conftest's distill_lora)."""
    return full_repository


@pytest.fixture(scope="module")
def served(repository_graphs) -> dict:
    """The repository's graphs (version folders), one ORT session each."""
    names = ("text_encoder", PLAIN, FEWSTEP, "vae_decoder")
    return {"sessions": {n: repository_graphs[n] for n in names},
            "manifest": read_lora_manifest(repository_graphs.folder(PLAIN)),
            "te_lora": zero_lora_inputs(read_lora_manifest(repository_graphs.folder("text_encoder")))}


def served_nets(base, served: dict, unet: str, lora: dict[str, np.ndarray] | None = None) -> DiffusionNets:
    """facetron's in-process nets over the repository's graphs: UNet model ``unet`` fed one item's LoRA inputs
    (``lora``: batch 1; None = zero = no user LoRA) per batch item."""
    return onnx_nets(base, served["sessions"], te_lora=served["te_lora"], unet=unet,
                     unet_lora=lora if lora is not None else zero_lora_inputs(served["manifest"]))


# ----------------------------------------------------------------------------- the LoRA: read, checked, refused


def test_both_formats_give_the_same_fewstep_unet(base, loras, distill_lora) -> None:
    """diffusers (peft names) and kohya keys give the same layers, scales and merged weights; the layers are the
    kinds an SD-1.5 LCM-LoRA adapts; the base UNet is left as it was."""
    peft, kohya = load_distill_lora(loras["distill"], base), load_distill_lora(loras["distill_kohya"], base)
    assert (peft.format, kohya.format) == ("diffusers", "kohya")
    assert set(peft.layers) == set(kohya.layers) and len(peft.layers) == 79
    assert {layer.scale for layer in kohya.layers.values()} == {distill_lora.alpha / distill_lora.rank}
    kinds = {layer_kind(m) for _, m in kohya.layers}
    assert {"conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.conv", "upsamplers.conv", "proj_in",
            "proj_out", "ff.net.0.proj", "ff.net.2", "attn1.to_q", "attn2.to_out.0"} <= kinds
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    a, b = (fewstep_unet(base, lora, distill_lora.weight).state_dict() for lora in (peft, kohya))
    for name, weight in base.unet.state_dict().items():
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
        assert torch.equal(weight, before[name]), name
    changed = [n for n in a if not torch.equal(a[n], before[n])]
    assert len(changed) == 79 and any("conv_shortcut" in n for n in changed)


def test_bad_distillation_loras_are_refused_before_any_export(base, loras, distill_lora, tmp_path) -> None:
    """Text-encoder layers, a LoRA for another UNet, a missing file, a bad weight: InvalidInputError naming the
    flag; an assembly with one writes nothing."""
    from facetron.export.repository import assemble_repository

    state = load_file(str(loras["distill_kohya"]))
    key = next(k for k in state if k.endswith("conv1.lora_down.weight"))
    wrong = dict(state, **{key: torch.zeros(distill_lora.rank, 7, 3, 3)})  # a UNet with other channels
    save_file(wrong, str(tmp_path / "other_unet.safetensors"))
    unknown = {k.replace("lora_unet_down_blocks_0", "lora_unet_down_blocks_7"): v for k, v in state.items()}
    save_file(unknown, str(tmp_path / "unknown.safetensors"))
    cases = {
        "text encoder": (loras["with_te"], "text-encoder layers"),
        "shape": (tmp_path / "other_unet.safetensors", "shape mismatch"),
        "names": (tmp_path / "unknown.safetensors", "match no layer"),
        "missing": (tmp_path / "nope.safetensors", "is not a file"),
    }
    for what, (path, rule) in cases.items():
        with pytest.raises(InvalidInputError) as err:
            load_distill_lora(path, base)
        assert err.value.input_name == "--distill-lora" and rule in err.value.rule, (what, err.value.rule)
    for weight in (0.0, -1.0, 2.5, float("nan")):
        with pytest.raises(InvalidInputError) as err:
            fewstep_unet(base, load_distill_lora(loras["distill"], base), weight)
        assert err.value.input_name == "--distill-weight"
    with pytest.raises(InvalidInputError, match="text-encoder layers"):
        assemble_repository("cpu", tmp_path / "repo", diffusion=DiffusionSource(distill_lora=loras["with_te"]))
    with pytest.raises(InvalidInputError, match="--distill-weight"):
        assemble_repository("cpu", tmp_path / "repo", diffusion=DiffusionSource(distill_lora=loras["distill"],
                                                                                 distill_weight=0.0))
    assert not (tmp_path / "repo").exists()


def test_cli_flags(tmp_path, capsys) -> None:
    from facetron.cli import main

    assert main(["export", "repository", "--faces-only", "--distill-lora", str(tmp_path / "x.safetensors"),
                 "--out", str(tmp_path / "r")]) == 2
    assert "--distill-lora" in capsys.readouterr().err
    assert main(["export", "repository", "--distill-weight", "0.5", "--out", str(tmp_path / "r")]) == 2
    assert "--distill-weight" in capsys.readouterr().err and not (tmp_path / "r").exists()
    with pytest.raises(SystemExit):
        main(["export", "repository", "--distill-weight", "heavy"])


# ----------------------------------------------------------------------------- which UNet a request runs on


def test_the_job_chooses_the_fewstep_unet_only_for_few_step_schedulers(tmp_path) -> None:
    """lcm / tcd run on unet_fewstep where model_info.json names a distillation LoRA (in merged mode too); every
    other scheduler, and lcm / tcd on a repository without one, on the plain unet (merged: unet_user_<id>)."""
    registry = UserRegistry(tmp_path / "users")
    info = {"resolution": 128, "latent_factor": 8}
    distilled = {**info, contract.DISTILL_INFO: {"hash": "0123456789abcdef", "weight": 1.0}}
    for scheduler in contract.SCHEDULERS:
        few = scheduler in contract.FEW_STEP_SCHEDULERS
        job = build_job(GeneratorRequest(scheduler=scheduler, steps=4), distilled, registry)
        assert job.unet == (FEWSTEP if few else PLAIN), scheduler
        assert build_job(GeneratorRequest(scheduler=scheduler, steps=4), info, registry).unet == PLAIN
        assert build_job(GeneratorRequest(scheduler=scheduler, steps=4), {**info, contract.DISTILL_INFO: None},
                         registry).unet == PLAIN
        assert unet_model(scheduler, distilled, "merged", "someone") == (FEWSTEP if few else "unet_user_someone")
    assert build_job(GeneratorRequest(steps=4), distilled, registry, GeneratorParams(identity_mode="merged")).unet \
        == PLAIN  # no user: the base UNet
    assert build_job(GeneratorRequest(), distilled, registry).unet == PLAIN  # the default scheduler: dpmsolver


def test_a_few_step_request_without_steps_or_guidance_runs_4_steps_unguided(tmp_path) -> None:
    """lcm / tcd leaving steps and guidance out get FEW_STEP_DEFAULT_STEPS (4) and guidance 1 (no negative
    branch), not the 25-step path's server defaults; what a request gives is kept; dpmsolver is unchanged."""
    registry = UserRegistry(tmp_path / "users")
    info = {"resolution": 128, "latent_factor": 8}
    params = GeneratorParams()
    for scheduler in contract.FEW_STEP_SCHEDULERS:
        sampling = build_job(GeneratorRequest(scheduler=scheduler), info, registry, params).sampling
        assert (sampling.steps, sampling.guidance) == (contract.FEW_STEP_DEFAULT_STEPS, 1.0)
        sampling = build_job(GeneratorRequest(scheduler=scheduler, steps=8, guidance=2.0), info, registry).sampling
        assert (sampling.steps, sampling.guidance) == (8, 2.0)
    sampling = build_job(GeneratorRequest(), info, registry, params).sampling
    assert (sampling.steps, sampling.guidance) == (params.default_steps, params.default_guidance)


def test_bls_nets_call_the_chosen_unet_model() -> None:
    """diffusion_nets sends the UNet calls to the model the job chose: unet_fewstep loads no merged model in merged
    mode (the user's LoRA rides on it from the bank); unet_user_<id> does; None keeps the identity mode's choice."""
    from facetron.triton import bls

    class Merged:
        def __init__(self):
            self.used = []

        def use(self, user_id, repository, user_version=None):
            self.used.append(user_id)
            return contract.merged_unet_name(user_id)

    info = {"latent_channels": 4, "latent_factor": 8}
    merged = Merged()
    nets = bls.diffusion_nets(info, "u1", "", "merged", Path("."), merged, "v1", unet_model=FEWSTEP)
    assert merged.used == [] and nets.unet_deep is not None  # runtime-LoRA: the step cache is served
    nets = bls.diffusion_nets(info, "u1", "", "merged", Path("."), merged, "v1", unet_model="unet_user_u1")
    assert merged.used == ["u1"] and nets.unet_deep is None
    bls.diffusion_nets(info, "u1", "", "merged", Path("."), merged, "v1")
    assert merged.used == ["u1", "u1"]
    with pytest.raises(ValueError, match="unet_model"):
        bls.diffusion_nets(info, "u1", "", "merged", Path("."), merged, "v1", unet_model="unet_user_u2")


# ----------------------------------------------------------------------------- the repository


def test_the_repository_serves_unet_fewstep_like_unet(repo, loras, distill_lora) -> None:
    """unet_fewstep: the unet's code, config (but its name), graph inputs, LoRA manifest and step-cache graph;
    model_info.json records the distillation LoRA (file hash, weight, format)."""
    fewstep, plain = repo / FEWSTEP, repo / PLAIN
    assert (fewstep / "1" / "model.py").read_text() == (plain / "1" / "model.py").read_text()
    for rel in ("1/io.json", "1/lora_manifest.json", "1/shallow/model.onnx"):
        assert (fewstep / rel).is_file(), rel
    io_f, io_p = (json.loads((f / "1" / "io.json").read_text()) for f in (fewstep, plain))
    assert io_f["inputs"] == io_p["inputs"] and io_f["outputs"] == io_p["outputs"]
    assert json.loads((fewstep / "1" / "lora_manifest.json").read_text()) == \
        json.loads((plain / "1" / "lora_manifest.json").read_text())
    cfg_f, cfg_p = ((f / "config.pbtxt").read_text() for f in (fewstep, plain))
    assert f'name: "{FEWSTEP}"' in cfg_f
    assert cfg_f.split("\nmax_batch_size", 1)[1] == cfg_p.split("\nmax_batch_size", 1)[1]
    info = json.loads((repo / "portrait_generator" / "1" / contract.MODEL_INFO).read_text())
    record = info[contract.DISTILL_INFO]
    assert record["format"] == "kohya" and record["weight"] == distill_lora.weight and record["model"] == FEWSTEP
    assert record["sha256"] == load_distill_lora(loras["distill_kohya"], load_base_model()).sha256
    assert record["hash"] == record["sha256"][:16] and record["layers"] == 79


# ----------------------------------------------------------------------------- equal to diffusers, in process


@pytest.mark.parametrize("scheduler, guidance, oracle_file", [
    ("lcm", 1.0, "distill_kohya"), ("tcd", 1.0, "distill"), ("lcm", 2.0, "distill_kohya")])
def test_fewstep_with_a_user_lora_equals_diffusers_set_adapters(base, loras, distill_lora, served, scheduler, guidance,
                                                                 oracle_file) -> None:
    """unet_fewstep (the distillation LoRA merged at its weight) fed the user's face LoRA at W_FACE equals diffusers
    with both loaded by load_lora_weights and weighted by set_adapters; guidance 1 (no negative branch) and one
    guided case."""
    face = lora_inputs_for(loras["face"], served["manifest"], W_FACE)
    req = request(scheduler, guidance=guidance)
    got = generate(served_nets(base, served, FEWSTEP, face), dict(base.scheduler.config), PROMPT, NEGATIVE, req)
    want = diffusers_images(diffusers_pipe(base, [(loras[oracle_file], distill_lora.weight), (loras["face"], W_FACE)]),
                            scheduler, guidance=guidance)
    assert_close(got, want, f"fewstep + face {scheduler} guidance={guidance} (diffusers read {oracle_file})")
    plain = generate(served_nets(base, served, PLAIN, face), dict(base.scheduler.config), PROMPT, NEGATIVE, req)
    assert_differs(got, plain, "the distillation LoRA")


def test_fewstep_without_a_user_equals_diffusers_distill_only(base, loras, distill_lora, served) -> None:
    req = request("lcm", guidance=1.0)
    got = generate(served_nets(base, served, FEWSTEP), dict(base.scheduler.config), PROMPT, NEGATIVE, req)
    want = diffusers_images(diffusers_pipe(base, [(loras["distill_kohya"], distill_lora.weight)]), "lcm", guidance=1.0)
    assert_close(got, want, "fewstep, no user LoRA, lcm")


def test_the_plain_unet_of_the_same_repository_is_unchanged(base, loras, served) -> None:
    """dpmsolver (not few-step) runs on the plain unet: diffusers with the face LoRA alone, no distillation."""
    face = lora_inputs_for(loras["face"], served["manifest"], W_FACE)
    got = generate(served_nets(base, served, PLAIN, face), dict(base.scheduler.config), PROMPT, NEGATIVE,
                   request("dpmsolver"))
    assert_close(got, diffusers_images(diffusers_pipe(base, [(loras["face"], W_FACE)]), "dpmsolver"),
                 "plain unet of a distilled repository, face LoRA, dpmsolver")


# ----------------------------------------------------------------------------- served by Triton


@pytest.fixture(scope="module")
def server(triton, users):
    """The session server (its registry holds USER)."""
    return triton


def _generator_request(scheduler: str, guidance: float) -> dict[str, np.ndarray]:
    inputs = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "user_id": USER, "scheduler": scheduler}
    req = {k: np.array([v.encode()], dtype=object) for k, v in inputs.items()}
    req.update(num_images=np.array([N], np.int32), steps=np.array([STEPS], np.int32),
               seed=np.array([SEED], np.int64), guidance=np.array([guidance], np.float32))
    return req


def _requests(server, model: str) -> int:
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(server.grpc_url) as raw:
        stats = raw.get_inference_statistics(model, headers=server.admin_headers, as_json=True)["model_stats"][0]
    return int(stats["inference_stats"]["success"].get("count", 0))


@pytest.mark.triton
def test_served_fewstep_equals_diffusers_and_dpmsolver_stays_on_unet(base, loras, distill_lora, server) -> None:
    """portrait_generator: lcm at guidance 1 runs on unet_fewstep (Triton's statistics) and equals diffusers with
    the distillation and face LoRAs; dpmsolver on the same server runs on the plain unet and equals diffusers
    with the face LoRA alone; portrait's report names the UNet that ran."""
    from facetron.client import FacetronClient

    with FacetronClient(server.grpc_url, timeout_s=300) as client:
        before = _requests(server, FEWSTEP), _requests(server, PLAIN)
        served_lcm = client.infer("portrait_generator", _generator_request("lcm", 1.0), ["images"])["images"]
        middle = _requests(server, FEWSTEP), _requests(server, PLAIN)
        served_dpm = client.infer("portrait_generator", _generator_request("dpmsolver", GUIDANCE), ["images"])["images"]
        after = _requests(server, FEWSTEP), _requests(server, PLAIN)
        report = client.portrait(USER, scheduler="tcd", steps=2, guidance=1.0, fuse=False, num_images=1,
                                 seed=SEED).report
    assert middle[0] > before[0] and middle[1] == before[1], (before, middle)
    assert after[1] > middle[1] and after[0] == middle[0], (middle, after)
    want = diffusers_pipe(base, [(loras["distill_kohya"], distill_lora.weight), (loras["face"], W_FACE)])
    assert_close(served_lcm, diffusers_images(want, "lcm", guidance=1.0), "served fewstep + face, lcm")
    face_only = diffusers_pipe(base, [(loras["face"], W_FACE)])
    assert_close(served_dpm, diffusers_images(face_only, "dpmsolver"), "served plain unet + face, dpmsolver")
    assert report["unet"] == FEWSTEP
