"""Styles served: the style registry (facetron.style_registry) and its CLI, the
runtime bank's face + style LoRA inputs, merged mode fusing a style, and
the served path (a style LoRA changes the portrait and equals diffusers'
``set_adapters``; an unknown or removed style is INVALID_ARGUMENT over gRPC).
Bad input is named and leaves nothing installed.

(The face + style LoRA comparisons against diffusers for every scheduler, in
runtime and merged mode, are in tests/test_diffusers_parity.py.)"""

from __future__ import annotations

import copy
import json
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file, save_file

from facetron.contract import DEFAULT_STYLE_WEIGHT
from facetron.diffusion.base_model import load_base_model
from facetron.diffusion.lora_inputs import lora_inputs_for
from facetron.diffusion.lora_reader import read_lora
from facetron.errors import InvalidInputError, NotFoundError
from facetron.export.runtime_lora import build_manifest
from facetron.pipeline.lora_bank import LoraBank, style_lora
from facetron.style_registry import LORA_FILE, StyleRegistry, styles_for, styles_root
from facetron.training.random_lora import write_random_lora
from facetron.users import UserRegistry
from user_tokens import grant  # noqa: E402

W_FACE = 0.9
PROMPT = "a photo of {trigger}, {subject}, watercolor"


@pytest.fixture(scope="module")
def base():
    return load_base_model()


@pytest.fixture(scope="module")
def loras(base, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("style_loras")
    style = write_random_lora(d / "style.safetensors", base.unet, rank=2, alpha=2, seed=41, std=0.2,
                              target_modules=("to_k", "to_v", "to_out.0"))
    # the same LoRA for a base model whose text encoder is 48 wide (cross-attention to_k/to_v take 48, not 32)
    other = {k: (torch.randn(v.shape[0], 48) if ".attn2.to_k.lora.down" in k or ".attn2.to_v.lora.down" in k else v)
             for k, v in load_file(str(style)).items()}
    save_file(other, str(d / "other_base.safetensors"), metadata={"format": "pt"})
    return {
        "face": write_random_lora(d / "face.safetensors", base.unet, rank=4, alpha=8, seed=42, std=0.1),
        "style": style,
        "other_base": d / "other_base.safetensors",
        "with_te": write_random_lora(d / "with_te.safetensors", base.unet, rank=2, alpha=2, seed=43, std=0.1,
                                     text_encoder=base.text_encoder),
        "kohya": to_kohya(style, d / "kohya.safetensors", alpha=2.0),
    }


def to_kohya(path: Path, out: Path, alpha: float) -> Path:
    """The same LoRA with kohya key names (lora_unet_<module_with_underscores>) and per-module alpha."""
    state = {}
    for key, value in load_file(str(path)).items():
        module, kind = key[len("unet."):].rsplit(".lora.", 1)
        name = "lora_unet_" + module.replace(".", "_")
        state[f"{name}.lora_down.weight" if kind.startswith("down") else f"{name}.lora_up.weight"] = value
        state[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(state, str(out))
    return out


def cli(argv: list[str]) -> int:
    from facetron.cli.main import main

    return main(argv)


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


# ----------------------------------------------------------------------------- the registry


def test_builtins_add_list_get_remove(tmp_path, loras) -> None:
    styles = StyleRegistry(tmp_path / "styles")
    assert styles.names()[:4] == ["studio", "business", "outdoor", "id_photo"] and styles.get("studio").lora is None
    installed = styles.add("watercolor", PROMPT, "photo, realistic", lora_file=loras["style"], weight=0.4)
    assert installed.lora == tmp_path / "styles" / "watercolor" / LORA_FILE and installed.lora_weight == 0.4
    assert styles.lora("watercolor") == (installed.lora, 0.4)
    plain = styles.add("plain", "a photo of {trigger}")  # no LoRA: prompt only
    assert plain.lora is None and styles.lora("plain", 0.3) == (None, 0.0)
    assert "watercolor" in styles.names() and styles.get("watercolor").negative == "photo, realistic"
    # a style without its own weight takes the server's w_style
    styles.add("default-weight", PROMPT, lora_file=loras["style"])
    assert styles.lora("default-weight", 0.3)[1] == 0.3 and styles.lora("default-weight")[1] == DEFAULT_STYLE_WEIGHT
    before = styles.version("watercolor")
    styles.add("watercolor", PROMPT, lora_file=loras["style"], weight=0.5, replace=True)
    assert styles.version("watercolor") != before and styles.get("watercolor").lora_weight == 0.5
    styles.remove("watercolor")
    with pytest.raises(InvalidInputError, match="style: unknown style 'watercolor'"):
        styles.get("watercolor")
    assert leftovers(tmp_path / "styles") == ["default-weight", "plain"]


def test_root_is_beside_the_user_registry(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("FACETRON_STYLES_DIR", raising=False)
    assert styles_root(tmp_path / "users") == tmp_path / "styles"
    monkeypatch.setenv("FACETRON_STYLES_DIR", str(tmp_path / "elsewhere"))
    assert styles_for(tmp_path / "users").root == tmp_path / "elsewhere"


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="../etc"), "name: '../etc' is not a valid style name"),
    (dict(name="studio"), "name: 'studio' is a built-in style"),
    (dict(prompt="  "), "--prompt: is empty"),
    (dict(prompt="a photo of {user}"), r"--prompt: has unknown placeholder\(s\) \{user\}"),
    (dict(prompt="a photo of {trigger"), "--prompt: is not a valid template"),
    (dict(weight=2.5), r"--weight: must be in 0..2, got 2.5"),
    (dict(weight=-0.1), r"--weight: must be in 0..2"),
    (dict(weight=float("nan")), r"--weight: must be in 0..2"),
    (dict(lora_file=None, weight=0.5), "--weight: is the style LoRA's weight: give --lora too"),
    (dict(lora_file="missing"), "no such file"),
    (dict(lora_file="kohya"), "not in facetron's canonical LoRA layout.*convert_lora_file"),
    (dict(lora_file="with_te"), "--lora: .* adapts 8 text-encoder layers .*UNet only"),
])
def test_bad_style_is_named_and_nothing_is_installed(tmp_path, loras, kwargs, match) -> None:
    styles = StyleRegistry(tmp_path / "styles")
    args = dict(name="bad", prompt=PROMPT, lora_file="style", weight=None)
    args.update(kwargs)
    if args["lora_file"] is not None:
        args["lora_file"] = loras.get(args["lora_file"], tmp_path / "missing.safetensors")
    with pytest.raises((InvalidInputError, NotFoundError), match=match):
        styles.add(args.pop("name"), args.pop("prompt"), **args)
    assert leftovers(tmp_path / "styles") == []


def test_existing_name_needs_replace_and_unknown_removal_is_not_found(tmp_path) -> None:
    styles = StyleRegistry(tmp_path / "styles")
    styles.add("mine", PROMPT)
    with pytest.raises(InvalidInputError, match="already installed.*--replace"):
        styles.add("mine", "another {trigger}")
    assert styles.get("mine").prompt == PROMPT
    with pytest.raises(NotFoundError, match="no installed style 'nope'"):
        styles.remove("nope")
    with pytest.raises(InvalidInputError, match="built-in style and cannot be removed"):
        styles.remove("studio")


def test_interrupted_add_leaves_nothing(tmp_path, loras, monkeypatch) -> None:
    import facetron.style_registry as styles_module

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(styles_module, "atomic_write_json", boom)
    with pytest.raises(OSError, match="simulated"):
        StyleRegistry(tmp_path / "styles").add("half", PROMPT, lora_file=loras["style"])
    assert leftovers(tmp_path / "styles") == []


# ----------------------------------------------------------------------------- the CLI


def test_cli_converts_checks_and_installs(tmp_path, loras, capsys) -> None:
    root = tmp_path / "styles"
    rc = cli(["styles", "add", "ink", "--prompt", PROMPT, "--lora", str(loras["kohya"]), "--weight", "0.3",
              "--styles-dir", str(root)])
    assert rc == 0 and "installed style 'ink'" in capsys.readouterr().out
    # the kohya file was converted to the canonical layout: the same layers as the diffusers original
    got, want = read_lora(root / "ink" / LORA_FILE), read_lora(loras["style"])
    assert set(got.layers) == set(want.layers)
    for key, layer in want.layers.items():
        np.testing.assert_allclose(got.layers[key].up @ got.layers[key].down * got.layers[key].scale,
                                   layer.up @ layer.down * layer.scale, rtol=1e-5, atol=1e-7)
    assert cli(["styles", "list", "--json", "--styles-dir", str(root)]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    ink = next(s for s in listed if s["name"] == "ink")
    assert ink["lora_weight"] == 0.3 and not ink["builtin"] and ink["lora_source"].endswith("kohya.safetensors")
    assert cli(["styles", "remove", "ink", "--styles-dir", str(root)]) == 0
    assert leftovers(root) == []


@pytest.mark.parametrize("argv, match", [
    (["--lora", "other_base"], r"shape mismatch at unet\..*attn2\.to_k.*\(32, 48\).*\(32, 32\).*different base model"),
    (["--lora", "style", "--weight", "3"], r"--weight: must be in 0..2, got 3"),
    (["--lora", "missing"], "missing.safetensors: no such file"),
])
def test_cli_bad_input_is_one_line_and_nothing_is_installed(tmp_path, loras, capsys, argv, match) -> None:
    import re

    root = tmp_path / "styles"
    argv = [str(loras.get(a, tmp_path / "missing.safetensors")) if prev == "--lora" else a
            for prev, a in zip([None] + argv, argv)]
    rc = cli(["styles", "add", "bad", "--prompt", PROMPT, *argv, "--styles-dir", str(root)])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("facetron styles: error:")]
    assert rc == 2 and len(errors) == 1 and re.search(match, errors[0]), errors
    assert leftovers(root) == []


# ----------------------------------------------------------------------------- the runtime bank


def test_bank_applies_face_and_style_with_their_weights(tmp_path, base, loras) -> None:
    manifest = build_manifest(base.unet, rank=8)
    users = UserRegistry(tmp_path / "users")
    users.save_reference_embedding("ann", np.ones((1, 128), np.float32))
    grant(users, "ann")
    users.install_lora("ann", loras["face"])
    styles = styles_for(users.root)
    styles.add("own-weight", PROMPT, lora_file=loras["style"], weight=0.6)
    styles.add("server-weight", PROMPT, lora_file=loras["style"])
    bank = LoraBank(manifest, users, partial(style_lora, styles=styles, w_style=0.3), w_face=W_FACE)

    def expect(face: bool, style_weight: float | None) -> dict[str, np.ndarray]:
        plan = ([(loras["face"], W_FACE)] if face else []) + ([(loras["style"], style_weight)] if style_weight else [])
        return lora_inputs_for(plan[0][0], manifest, plan[0][1], extra=plan[1:])

    for (user, style), want in {("ann", "own-weight"): expect(True, 0.6), ("ann", "server-weight"): expect(True, 0.3),
                                ("", "own-weight"): expect(False, 0.6), ("ann", "studio"): expect(True, None)}.items():
        got = bank.get(user, style)
        for name, value in want.items():
            np.testing.assert_array_equal(got[name], value, err_msg=f"{user}/{style}: {name}")
    batch = bank.batch(bank.keys([("ann", "own-weight"), ("", "")]))  # per item: face + style, then the base model
    assert batch["lora_b_0"][0].any() and not batch["lora_b_0"][1].any()
    with pytest.raises(InvalidInputError, match="style: unknown style 'cubism'"):
        bank.get("ann", "cubism")


# ----------------------------------------------------------------------------- merged mode


def test_merged_user_fuses_the_style_equal_to_diffusers(tmp_path, base, loras) -> None:
    """add_merged_user(style=...) fuses face + the style's LoRA at the style's
    weight; its ONNX UNet equals diffusers' UNet under set_adapters."""
    from diffusers import StableDiffusionPipeline

    from facetron.export.repository import add_merged_user

    repo = tmp_path / "repo"
    (repo / "portrait_generator").mkdir(parents=True)
    (repo / "portrait_generator" / "config.pbtxt").write_text('name: "portrait_generator"\n')
    users = UserRegistry(tmp_path / "users")
    users.save_reference_embedding("mia", np.ones((1, 128), np.float32))
    grant(users, "mia")
    users.install_lora("mia", loras["face"])
    styles_for(users.root).add("ink", PROMPT, lora_file=loras["style"], weight=0.6)
    model = add_merged_user(repo, "mia", users.root, style="ink")
    info = json.loads((model / "1" / "facetron_merge.json").read_text())
    assert info["style"] == "ink" and [(x["role"], x["weight"]) for x in info["loras"]] == [("face", W_FACE), ("style", 0.6)]

    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                   unet=copy.deepcopy(base.unet), scheduler=base.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    for name, path in (("face", loras["face"]), ("style", loras["style"])):
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
    pipe.set_adapters(["face", "style"], adapter_weights=[W_FACE, 0.6])
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        want = pipe.unet(x, t, ctx).sample.numpy()
    sess = ort.InferenceSession(str(model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": ctx.numpy()})[0]
    diff = float(np.abs(got - want).max())
    print(f"merged face+style ONNX vs diffusers set_adapters UNet: max abs {diff:.2g}")
    assert diff <= 1e-4  # fp32 (W + ΣwBA)x in ORT vs peft's Wx + Σw·B(Ax) in torch


def test_merged_user_refuses_unserved_text_encoder_layers_and_unknown_styles(tmp_path, base, loras) -> None:
    """Text-encoder q/k/v/out layers are served (by the runtime-LoRA text encoder, also in
    merged mode); others (here the MLP's fc1) are refused by name before any work."""
    from facetron.export.repository import add_merged_user

    repo = tmp_path / "repo"
    (repo / "portrait_generator").mkdir(parents=True)
    (repo / "portrait_generator" / "config.pbtxt").write_text('name: "portrait_generator"\n')
    users = UserRegistry(tmp_path / "users")
    mlp = write_random_lora(tmp_path / "te_mlp.safetensors", base.unet, rank=2, alpha=2, seed=6, std=0.1,
                            text_encoder=base.text_encoder, te_target_modules=("q_proj", "fc1"))
    for user, lora in (("te-user", mlp), ("ok-user", loras["face"])):
        users.save_reference_embedding(user, np.ones((1, 128), np.float32))
        grant(users, user)
        users.install_lora(user, lora)
    with pytest.raises(InvalidInputError, match="--user: user 'te-user'.* adapts 2 text-encoder layers the "
                                                "runtime-LoRA text encoder has no inputs for.*fc1"):
        add_merged_user(repo, "te-user", users.root)
    with pytest.raises(InvalidInputError, match="style: unknown style 'cubism'"):
        add_merged_user(repo, "ok-user", users.root, style="cubism")
    assert leftovers(repo) == ["portrait_generator"]


# ----------------------------------------------------------------------------- served


def _request(**kw) -> dict[str, np.ndarray]:
    out = {k: np.array([v.encode()], dtype=object) for k, v in kw.items() if isinstance(v, str)}
    out.update({k: np.array([v], np.int64 if k == "seed" else np.int32) for k, v in kw.items() if isinstance(v, int)})
    return out


@pytest.mark.triton
def test_served_style_lora_changes_the_portrait_and_equals_diffusers(base, loras, client, users_dir) -> None:
    """Base model + a style LoRA only (no user): the bank's style-only path
    equals diffusers with that one adapter at the style's weight; removing the
    style makes it unknown to the server at once."""
    from diffusers import StableDiffusionPipeline

    styles = styles_for(users_dir)
    styles.add("served-ink", "a photo of {trigger}, ink drawing", lora_file=loras["style"], weight=1.5, replace=True)
    common = dict(prompt="a photo of a person, ink drawing", negative_prompt="blurry", scheduler="ddim", steps=4, seed=3,
                  num_images=1)
    plain = client.infer("portrait_generator", _request(style="studio", **common), ["images"])["images"]
    styled = client.infer("portrait_generator", _request(style="served-ink", **common), ["images"])["images"]
    assert np.abs(plain.astype(int) - styled.astype(int)).mean() > 2.0  # the style LoRA changes the picture

    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                   unet=copy.deepcopy(base.unet), scheduler=base.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(base.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(loras["style"].parent), weight_name=loras["style"].name, adapter_name="ink")
    pipe.set_adapters(["ink"], adapter_weights=[1.5])
    with torch.no_grad():
        want = pipe(common["prompt"], negative_prompt=common["negative_prompt"], num_inference_steps=4, guidance_scale=7.0,
                    height=128, width=128, generator=[torch.Generator().manual_seed(3)], output_type="np").images
    want = (want * 255).round().astype(np.uint8)
    diff = np.abs(styled.astype(int) - want.astype(int))
    print(f"served style-only LoRA vs diffusers: max {diff.max()}/255, mean {diff.mean():.4f}/255")
    assert diff.max() <= 2 and diff.mean() <= 0.01

    styles.remove("served-ink")
    with pytest.raises(InvalidInputError, match="unknown style 'served-ink'"):
        client.infer("portrait_generator", _request(style="served-ink", **common), ["images"])
