"""LoRA files and the merge: formats, errors, and the fused weights checked
against a hand-written W + w·(alpha/r)·B@A and against diffusers' own
load_lora_weights + set_adapters + fuse_lora path (tiny model)."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from facetron.diffusion.base_model import load_base_model
from facetron.errors import InvalidInputError, NotFoundError
from facetron.export.lora_files import load_lora, parse_lora_state_dict
from facetron.export.merge import merge_loras, save_merged
from facetron.training.random_lora import write_random_lora

FACE_R, FACE_ALPHA = 4, 8.0  # scale 2
STYLE_R, STYLE_ALPHA = 2, 1.0  # scale 0.5
TE_R, TE_ALPHA = 4, 2.0  # scale 0.5
W_FACE, W_STYLE = 0.9, 0.25
# fp32 sums of a few products: weights agree to rounding
WEIGHT_TOL = 1e-6
OUTPUT_TOL = 1e-5


@pytest.fixture(scope="module")
def base():
    return load_base_model()


@pytest.fixture(scope="module")
def loras(base, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("loras")
    return {
        "face": write_random_lora(d / "face.safetensors", base.unet, rank=FACE_R, alpha=FACE_ALPHA, seed=1, std=0.1),
        "style": write_random_lora(d / "style.safetensors", base.unet, rank=STYLE_R, alpha=STYLE_ALPHA, seed=2,
                                   std=0.1, target_modules=("to_q", "to_v")),
        "face_te": write_random_lora(d / "face_te.safetensors", base.unet, rank=FACE_R, alpha=FACE_ALPHA, seed=3,
                                     std=0.1, text_encoder=base.text_encoder, te_rank=TE_R, te_alpha=TE_ALPHA),
    }


def to_kohya(path: Path, out: Path) -> Path:
    """Rewrite a diffusers LoRA file with kohya names (lora_unet_<module_with_underscores>) + .alpha."""
    alpha = FACE_ALPHA
    sd = load_file(str(path))
    k = {}
    for key, v in sd.items():
        comp, rest = key.split(".", 1)
        assert comp == "unet"
        module, kind = rest.rsplit(".lora.", 1)
        name = "lora_unet_" + module.replace(".", "_")
        k[f"{name}.lora_down.weight" if kind.startswith("down") else f"{name}.lora_up.weight"] = v
        k[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(k, str(out))
    return out


def manual_deltas(path: Path, scale_by_comp: dict[str, float]) -> dict[tuple[str, str], torch.Tensor]:
    """Independent of facetron's loader: raw keys of the diffusers file, B@A·scale."""
    sd = load_file(str(path))
    out = {}
    for key in sd:
        if ".down." not in key and not key.endswith("lora.down.weight"):
            continue
        comp, rest = key.split(".", 1)
        module = rest.split(".lora_linear_layer.")[0] if "lora_linear_layer" in rest else rest.rsplit(".lora.", 1)[0]
        down, up = sd[key], sd[key.replace("down.weight", "up.weight")]
        out[(comp, module)] = scale_by_comp[comp] * (up.double() @ down.double())
    return out


# ----------------------------------------------------------------------------- loading


def test_loads_diffusers_file_with_alpha_from_metadata(loras):
    lora = load_lora(loras["face"])
    assert lora.format == "diffusers"
    assert len(lora.component("unet")) == 32  # 8 attentions x q,k,v,out
    layer = next(iter(lora.layers.values()))
    assert (layer.rank, layer.alpha, layer.scale) == (FACE_R, FACE_ALPHA, FACE_ALPHA / FACE_R)
    assert float(layer.up.abs().max()) > 0  # B was perturbed: the LoRA does something


def test_kohya_file_gives_the_same_layers(loras, tmp_path):
    diff = load_lora(loras["face"])
    kohya = load_lora(to_kohya(loras["face"], tmp_path / "kohya.safetensors"))
    assert kohya.format == "kohya"
    assert set(kohya.layers) == set(diff.layers)
    for key, layer in diff.layers.items():
        assert kohya.layers[key].scale == layer.scale
        torch.testing.assert_close(kohya.layers[key].delta(), layer.delta(), rtol=0, atol=0)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(NotFoundError, match="nope.safetensors"):
        load_lora(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("content", [b"not a safetensors file at all", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":"])
def test_corrupt_file_is_named(tmp_path, content):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    with pytest.raises(InvalidInputError, match="bad.safetensors.*safetensors"):
        load_lora(bad)


def test_truncated_file_is_named(loras, tmp_path):
    data = loras["face"].read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidInputError, match="truncated.safetensors"):
        load_lora(bad)


def test_lora_for_another_base_names_first_mismatching_layer(base, tmp_path):
    from diffusers import UNet2DConditionModel

    from facetron.diffusion.model_spec import TINY

    torch.manual_seed(0)
    other = UNet2DConditionModel(**{**TINY.unet, "cross_attention_dim": 48})
    path = write_random_lora(tmp_path / "other.safetensors", other, rank=4, alpha=4, seed=0, std=0.1)
    with pytest.raises(InvalidInputError) as err:
        merge_loras(base, path)
    msg = str(err.value)
    assert "other.safetensors" in msg
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k" in msg  # first in network order
    assert "(32, 48)" in msg and "(32, 32)" in msg


def test_keys_matching_no_layer_are_named(base, loras, tmp_path):
    sd = load_file(str(loras["face"]))
    renamed = {k.replace("mid_block", "middle_blok"): v for k, v in sd.items()}
    bad = tmp_path / "renamed.safetensors"
    save_file(renamed, str(bad))
    with pytest.raises(InvalidInputError, match=r"8 of 32 unet layers match no layer.*middle_blok.*\(\+5 more\)"):
        merge_loras(base, bad)


def test_unsupported_keys_are_named():
    with pytest.raises(InvalidInputError, match="DoRA"):
        parse_lora_state_dict({"unet.a.lora_A.weight": torch.zeros(1, 2), "unet.a.lora_magnitude_vector": torch.zeros(2)})
    with pytest.raises(InvalidInputError, match="neither LoRA down"):
        parse_lora_state_dict({"unet.a.weight": torch.zeros(1, 2)})
    with pytest.raises(InvalidInputError, match="no up"):
        parse_lora_state_dict({"unet.a.lora_A.weight": torch.zeros(1, 2)})


# ----------------------------------------------------------------------------- merging


def test_merge_equals_manual_sum(base, loras):
    unet, _ = merge_loras(base, loras["face"], loras["style"], w_face=W_FACE, w_style=W_STYLE)
    face = manual_deltas(loras["face"], {"unet": FACE_ALPHA / FACE_R})
    style = manual_deltas(loras["style"], {"unet": STYLE_ALPHA / STYLE_R})
    assert len(face) == 32 and len(style) == 16
    for name, module in base.unet.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        want = module.weight.double().clone()
        want += W_FACE * face.get(("unet", name), 0) + W_STYLE * style.get(("unet", name), 0)
        got = unet.get_submodule(name).weight.double()
        assert (got - want).abs().max() <= WEIGHT_TOL, name
    # the base model is untouched
    assert not torch.equal(unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn1.to_q").weight,
                           base.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn1.to_q").weight)


def _diffusers_fused(base, paths: list[Path], weights: list[float]):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=copy.deepcopy(base.text_encoder),
                                   tokenizer=base.tokenizer, unet=copy.deepcopy(base.unet), scheduler=base.scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    names = [f"a{i}" for i in range(len(paths))]
    for name, path in zip(names, paths):
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
    pipe.set_adapters(names, adapter_weights=weights)
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # keeps the fused weights, drops the peft layers
    return pipe.unet, pipe.text_encoder


def test_merge_equals_diffusers_fuse_lora(base, loras):
    paths, weights = [loras["face_te"], loras["style"]], [W_FACE, W_STYLE]
    ref_unet, ref_te = _diffusers_fused(base, paths, weights)
    unet, te = merge_loras(base, *paths, w_face=W_FACE, w_style=W_STYLE)
    worst = 0.0
    for model, ref in ((unet, ref_unet), (te, ref_te)):
        ref_sd = ref.state_dict()
        for key, value in model.state_dict().items():
            worst = max(worst, float((value - ref_sd[key]).abs().max()))
    assert worst <= WEIGHT_TOL
    # the text encoder really changed (the file has text-encoder layers)
    assert not torch.equal(te.state_dict()["encoder.layers.0.self_attn.q_proj.weight"],
                           base.text_encoder.state_dict()["encoder.layers.0.self_attn.q_proj.weight"])
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10.0, 500.0]), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        diff = (unet(x, t, ctx).sample - ref_unet(x, t, ctx).sample).abs().max()
        ids = torch.randint(0, 49406, (2, 77), generator=g)
        diff_te = (te(ids)[0] - ref_te(ids)[0]).abs().max()
    assert diff <= OUTPUT_TOL and diff_te <= OUTPUT_TOL


def test_text_encoder_lora_matches_manual_sum(base, loras):
    _, te = merge_loras(base, loras["face_te"], w_face=W_FACE)
    deltas = manual_deltas(loras["face_te"], {"unet": FACE_ALPHA / FACE_R, "text_encoder": TE_ALPHA / TE_R})
    te_deltas = {m: d for (c, m), d in deltas.items() if c == "text_encoder"}
    assert len(te_deltas) == 8
    for name, delta in te_deltas.items():
        want = base.text_encoder.get_submodule(name).weight.double() + W_FACE * delta
        assert (te.get_submodule(name).weight.double() - want).abs().max() <= WEIGHT_TOL


def test_bad_weight_is_named(base, loras):
    with pytest.raises(InvalidInputError, match="--w-face"):
        merge_loras(base, loras["face"], w_face=float("nan"))


# ----------------------------------------------------------------------------- saving


def test_save_merged_writes_a_loadable_model(base, loras, tmp_path):
    unet, te = merge_loras(base, loras["face"], w_face=W_FACE)
    out = save_merged(base, unet, te, tmp_path / "merged", provenance={"loras": ["face"]})
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "text_encoder" / "model.safetensors").is_file()
    assert json.loads((out / "facetron_merge.json").read_text()) == {"loras": ["face"]}
    again = load_base_model(out)
    assert again.is_smoke_model
    for key, value in unet.state_dict().items():
        assert torch.equal(again.unet.state_dict()[key], value), key


def test_interrupted_save_leaves_nothing(base, loras, tmp_path, monkeypatch):
    import facetron.export.merge as merge_mod

    def boom(*a, **k):
        raise RuntimeError("simulated crash mid-write")

    monkeypatch.setattr(merge_mod.shutil, "copytree", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        save_merged(base, base.unet, base.text_encoder, tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_out_is_named(base, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(InvalidInputError, match="--out .*a_file/merged"):
        save_merged(base, base.unet, base.text_encoder, blocker / "merged")


# ----------------------------------------------------------------------------- CLI


def _cli(argv: list[str], monkeypatch) -> int:
    import facetron.cli as cli

    return cli.main(argv)


def test_cli_merge(loras, tmp_path, monkeypatch, capsys):
    rc = _cli(["export", "merge", "--face-lora", str(loras["face"]), "--style-lora", str(loras["style"]),
               "--w-face", "0.8", "--out", str(tmp_path / "m")], monkeypatch)
    assert rc == 0
    info = json.loads((tmp_path / "m" / "facetron_merge.json").read_text())
    assert [(x["role"], x["weight"]) for x in info["loras"]] == [("face", 0.8), ("style", 0.25)]
    assert "not portraits" in capsys.readouterr().out


def test_cli_missing_lora_is_one_clear_line(tmp_path, monkeypatch, capsys):
    rc = _cli(["export", "merge", "--face-lora", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "m")],
              monkeypatch)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "missing.safetensors" in err
    assert not (tmp_path / "m").exists()


def test_export_parser_has_nested_steps():
    from facetron.cli.export import add_parser, add_subcommand

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    extra = add_subcommand("extra-step", help="added by another part")
    extra.set_defaults(func=lambda a: 0)
    args = parser.parse_args(["export", "extra-step"])
    assert args.export_command == "extra-step"
    assert parser.parse_args(["export", "repository", "--target", "gpu"]).target == "gpu"
