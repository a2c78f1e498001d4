"""Identity LoRA training on the tiny embedded model (CPU, a few seconds per run).

The dataset is 4 pictures of coloured shapes made here. The loss-falls run
uses a raised learning rate (5e-3 instead of FaceChain's 1.5e-4): at 1.5e-4
thirty steps barely move a rank-4 LoRA. With seed 0 the measured mean loss
of the first 8 steps is ~1.04 and of the last 8 ~0.85; the test asks for a
drop of at least 0.05.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from facetron.atomic import ARTIFACT_MARKER
from facetron.errors import FacetronError, InvalidInputError, NotFoundError
from facetron.training.dataset import METADATA_FILE, CaptionedImages, read_metadata, write_dataset
from facetron.training.lora_config import LoraTrainConfig
from facetron.training.train_lora import OutputPaths, train_lora

STEPS = 30
LR = 5e-3
SEED = 0
COLOURS = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 200, 30)]


def shape_images(n: int = 4) -> list[np.ndarray]:
    """Dark background, a coloured disc and a white bar that move per image."""
    yy, xx = np.mgrid[:128, :128]
    images = []
    for k in range(n):
        img = np.full((128, 128, 3), 30, np.uint8)
        img[(yy - 40 - 10 * k) ** 2 + (xx - 64) ** 2 < 30**2] = COLOURS[k % 4]
        img[90:120, 20 + 20 * k : 50 + 20 * k] = 250
        images.append(img)
    return images


def config(**kw) -> LoraTrainConfig:
    return LoraTrainConfig(**{"steps": STEPS, "learning_rate": LR, "seed": SEED, "checkpoint_every": 1000, **kw})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train") / "dataset"
    captions = [f"a photo of <facetron-user>, shape {k}" for k in range(4)]
    return write_dataset(root, shape_images(), captions)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ref") / "reference_embedding.npy"
    np.save(path, np.ones((1, 128), np.float32) / np.sqrt(128))
    return path


@pytest.fixture(scope="module")
def trained(dataset: Path, reference: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("straight") / "loras"
    return train_lora(dataset, out, user_id="alice", config=config(), progress=False, reference_embedding=reference)


def test_dataset_reads_metadata_and_makes_tensors(dataset: Path) -> None:
    from facetron.diffusion.base_model import load_base_model

    tok = load_base_model().tokenizer
    ds = CaptionedImages(dataset, tok, 64, seed=3)
    item = ds[0]
    assert len(ds) == 4 and item["pixel_values"].shape == (3, 64, 64) and item["input_ids"].shape == (77,)
    assert -1.0 <= float(item["pixel_values"].min()) and float(item["pixel_values"].max()) <= 1.0
    assert torch.equal(ds.pixel_values(1, flip=True), torch.flip(ds.pixel_values(1), dims=[2]))
    flipped = []
    for epoch in range(4):
        ds.set_epoch(epoch)
        flipped += [torch.equal(ds[i]["pixel_values"], ds.pixel_values(i, flip=True)) for i in range(4)]
    assert any(flipped) and not all(flipped)  # a seeded coin per (image, epoch)
    again = CaptionedImages(dataset, tok, 64, seed=3)
    again.set_epoch(3)
    assert torch.equal(again[2]["pixel_values"], ds[2]["pixel_values"])  # replayable after a restart


def test_loss_falls(trained) -> None:
    losses = np.asarray(trained.losses)
    assert len(losses) == STEPS and np.isfinite(losses).all()
    first, last = losses[:8].mean(), losses[-8:].mean()
    assert last < first - 0.05, (first, last)


def test_saved_file_loads_in_diffusers_and_matches_our_unet(trained) -> None:
    from diffusers import StableDiffusionPipeline

    from facetron.diffusion.base_model import load_base_model

    base = load_base_model()
    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                   unet=base.unet, scheduler=base.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(trained.lora_path.parent), weight_name=trained.lora_path.name)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    hidden = torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([100, 700])
    with torch.no_grad():
        ours = trained.unet(x, t, hidden).sample
        loaded = pipe.unet(x, t, hidden).sample
        plain = load_base_model().unet(x, t, hidden).sample
    assert torch.allclose(loaded, ours, atol=1e-5, rtol=0), float((loaded - ours).abs().max())
    assert float((ours - plain).abs().max()) > 1e-3  # training moved lora_B away from zero


def test_kill_and_resume_equals_straight_run(dataset: Path, trained, tmp_path: Path) -> None:
    class Killed(Exception):
        pass

    def kill_at_12(step: int, loss: float) -> None:
        if step == 12:
            raise Killed

    out = tmp_path / "loras"
    with pytest.raises(Killed):
        train_lora(dataset, out, user_id="alice", config=config(checkpoint_every=5), progress=False,
                   callback=kill_at_12)
    ckpts = sorted(p.name for p in (out / "alice.ckpt").iterdir())
    assert ckpts == [ARTIFACT_MARKER, "step-000005", "step-000010"] and not (out / "alice.safetensors").exists()
    with pytest.raises(InvalidInputError, match="--resume"):  # never silently restarts over checkpoints
        train_lora(dataset, out, user_id="alice", config=config(checkpoint_every=5), progress=False)
    with pytest.raises(InvalidInputError, match="different config"):  # settings must match the checkpoint
        train_lora(dataset, out, user_id="alice", config=config(learning_rate=1e-3), progress=False, resume=True)

    resumed = train_lora(dataset, out, user_id="alice", config=config(checkpoint_every=5), progress=False,
                         resume=True)
    assert resumed.resumed_from == 10 and len(resumed.losses) == STEPS
    assert resumed.losses == trained.losses  # same data order, noise and timesteps after the restart
    a, b = load_file(str(trained.lora_path)), load_file(str(resumed.lora_path))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst == 0.0, worst  # bit-identical on the same machine; 1e-6 would be the fallback bound
    assert not (out / "alice.ckpt").exists()  # checkpoints are dropped once the output is written


def test_bad_inputs_are_named_and_nothing_is_written(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    no_meta = tmp_path / "no_meta"
    no_meta.mkdir()
    (no_meta / "0001.png").write_bytes((dataset / "0001.png").read_bytes())
    missing = tmp_path / "missing"
    write_dataset(missing, shape_images(2), ["a", "b"])
    (missing / METADATA_FILE).write_text('{"file_name": "0001.png", "text": "a"}\n'
                                         '{"file_name": "0009.png", "text": "b"}\n')
    broken = tmp_path / "broken"
    write_dataset(broken, shape_images(1), ["a"])
    (broken / METADATA_FILE).write_text('{"file_name": "0001.png", "text": "a"}\n{not json\n')
    zero = tmp_path / "zero"
    write_dataset(zero, shape_images(1), ["a"])
    (zero / METADATA_FILE).write_text("\n")

    cases = [
        (tmp_path / "nowhere", "alice", NotFoundError, "nowhere: no such folder"),
        (empty, "alice", InvalidInputError, f"{empty}.*has no metadata.jsonl"),
        (no_meta, "alice", InvalidInputError, f"{no_meta}.*has no metadata.jsonl"),
        (missing, "alice", InvalidInputError, r"metadata.jsonl:2.*'0009.png'.*does not exist"),
        (broken, "alice", InvalidInputError, r"metadata.jsonl:2.*not valid JSON"),
        (zero, "alice", InvalidInputError, r"zero rows"),
        (dataset, "../x", InvalidInputError, r"--user.*'\.\./x' is not a valid user id"),
    ]
    for folder, user, error, pattern in cases:
        with pytest.raises(error, match=pattern) as info:
            train_lora(folder, out, user_id=user, config=config(steps=2), progress=False)
        assert isinstance(info.value, FacetronError)
        assert not out.exists(), f"{folder.name}: something was written under {out}"
    with pytest.raises(InvalidInputError, match="steps"):
        LoraTrainConfig(steps=0)
    assert len(read_metadata(dataset)) == 4


def test_sidecar_has_the_fields(trained, reference: Path) -> None:
    from facetron import __version__
    from facetron.diffusion.base_model import ensure_tiny_model, model_hash

    meta = json.loads(trained.metadata_path.read_text())
    assert trained.metadata_path == trained.lora_path.with_suffix(".json")
    assert trained.lora_path.name == "alice.safetensors"
    assert meta["base_model"]["path"] == str(ensure_tiny_model().resolve())
    assert meta["base_model"]["model_hash"] == model_hash(ensure_tiny_model())
    assert meta["smoke_model"] is True and meta["base_model"]["smoke_model"] is True
    assert (meta["rank"], meta["alpha"], meta["steps"], meta["lr"]) == (4, 32.0, STEPS, LR)
    assert meta["trigger_token"] == "<facetron-user>" and meta["captions_with_trigger_token"] == "4/4"
    loss = meta["loss"]
    assert {"first", "last", "min", "window"} <= loss.keys() and loss["min"] <= min(loss["first"], loss["last"])
    assert meta["reference_embedding"] == str(reference.resolve())
    assert meta["facetron_version"] == __version__
    assert meta["time_s"] > 0 and meta["training"]["latents"].startswith("VAE posterior mean")


def test_text_encoder_lora_is_trained_and_saved(dataset: Path, tmp_path: Path) -> None:
    result = train_lora(dataset, tmp_path / "bob.safetensors", user_id="bob",
                        config=config(steps=3, text_encoder_rank=4), progress=False)
    keys = load_file(str(result.lora_path)).keys()
    te = [k for k in keys if k.startswith("text_encoder.")]
    assert te and any(k.startswith("unet.") for k in keys)
    assert json.loads(result.metadata_path.read_text())["lora"]["text_encoder_rank"] == 4

    from diffusers import StableDiffusionPipeline

    from facetron.diffusion.base_model import load_base_model

    base = load_base_model()
    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                   unet=base.unet, scheduler=base.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(tmp_path), weight_name="bob.safetensors")
    ids = base.tokenizer(["a photo of <facetron-user>"], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        ours, loaded = result.text_encoder(ids)[0], pipe.text_encoder(ids)[0]
        plain = load_base_model().text_encoder(ids)[0]
    assert torch.allclose(loaded, ours, atol=1e-5, rtol=0)
    assert float((ours - plain).abs().max()) > 1e-3


def test_cli_train_lora(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import argparse

    from facetron.cli import train as train_cmd

    parser = argparse.ArgumentParser(prog="facetron")
    train_cmd.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", "lora", str(dataset), "--user", "carol", "--train-steps", "2", "--out",
                              str(tmp_path / "loras"), "--no-progress", "--seed", "1"])
    assert args.func(args) == 0
    assert (tmp_path / "loras" / "carol.safetensors").is_file() and (tmp_path / "loras" / "carol.json").is_file()
    assert "not portraits" in capsys.readouterr().out


# --- the ownership rule of `train lora --out` (no training: refused before any work) ------


def _facetron_sidecar(lora: Path) -> None:
    """What train lora writes beside a LoRA: a facetron JSON record naming it."""
    lora.with_suffix(".json").write_text(json.dumps({"user_id": lora.stem, "lora_file": lora.name,
                                                     "facetron_version": "0.1.0"}))


def test_out_never_overwrites_a_lora_facetron_did_not_write(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "loras"
    out.mkdir()
    foreign = out / "dana.safetensors"
    foreign.write_bytes(b"someone else's LoRA")
    with pytest.raises(InvalidInputError, match=r"dana\.safetensors.*facetron did not write it.*never overwrites"):
        train_lora(dataset, out, user_id="dana", config=config(), progress=False)
    assert foreign.read_bytes() == b"someone else's LoRA" and sorted(p.name for p in out.iterdir()) == [foreign.name]
    (out / "dana.json").write_text(json.dumps({"note": "not facetron's"}))  # a sidecar facetron did not write
    with pytest.raises(InvalidInputError, match=r"dana\.safetensors"):
        OutputPaths.for_user(out, "dana").check_owned()
    _facetron_sidecar(foreign)  # facetron's sidecar names it: facetron wrote it, may replace it
    OutputPaths.for_user(out, "dana").check_owned()
    assert [why for _, why in OutputPaths.for_user(out, "dana").present()] == [None, None]


def test_out_never_deletes_a_foreign_ckpt_folder(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "loras"
    ckpt = out / "erin.ckpt"
    ckpt.mkdir(parents=True)
    (ckpt / "notes.txt").write_text("mine")
    rule = rf"erin\.ckpt.*no {ARTIFACT_MARKER} marker.*never writes into or deletes"
    with pytest.raises(InvalidInputError, match=rule):
        train_lora(dataset, out, user_id="erin", config=config(), progress=False)
    assert (ckpt / "notes.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["erin.ckpt"]
    candidates = out / "erin.candidates"
    candidates.mkdir()
    (candidates / "step-000001.safetensors").write_bytes(b"x")  # an earlier facetron run left it unmarked: adopted
    (ckpt / "notes.txt").unlink()  # empty: facetron may use it
    paths = OutputPaths.for_user(out, "erin")
    paths.check_owned()
    (candidates / "photo.jpg").write_bytes(b"y")
    with pytest.raises(InvalidInputError, match=r"erin\.candidates.*e\.g\. photo\.jpg"):
        paths.check_owned()
    foreign = f"a folder facetron did not make (no {ARTIFACT_MARKER} marker)"
    assert dict(paths.present()) == {ckpt: None, candidates: foreign}


def test_out_marks_what_it_writes_and_removes_only_its_own_ckpt(trained) -> None:
    """The straight run: the sidecar names the LoRA (the file's marker), the checkpoints folder is gone."""
    paths = OutputPaths.for_user(trained.lora_path.parent, "alice")
    assert json.loads(paths.metadata.read_text())["lora_file"] == paths.lora.name
    assert paths.present() == [(paths.lora, None), (paths.metadata, None)]  # no .ckpt left, nothing foreign


# --- precision per machine, and the early stop --------------------------------------------


def test_precision_choice_follows_the_cpu_flags() -> None:
    from facetron.cpu_info import bf16_fast
    from facetron.training.lora_config import choose_precision

    for flags, name in ((["amx_bf16"], "bf16"), (["avx512_bf16"], "bf16"), ([], "f32")):
        choice = choose_precision("auto", "no", "cpu", flags)
        assert (choice.name, choice.cpu_autocast, choice.mixed_precision) == (name, name == "bf16", "no")
        assert choice.why.startswith("auto:")
    assert choose_precision("bf16", "no", "cpu", []).cpu_autocast  # forceable where the CPU has no bf16 kernels
    assert not choose_precision("f32", "no", "cpu", ["amx_bf16"]).cpu_autocast
    assert choose_precision("auto", "fp16", "cuda", []).mixed_precision == "fp16"  # CUDA: mixed_precision as before
    assert choose_precision("bf16", "no", "cuda", []).mixed_precision == "bf16"
    with pytest.raises(InvalidInputError, match="precision.*contradicts"):
        choose_precision("f32", "bf16", "cuda", [])
    # this machine: torch's own CPU probe (independent of lscpu) says whether bf16 runs in hardware
    torch_says = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert bool(bf16_fast()) == torch_says
    for bad in ({"precision": "fp8"}, {"stop_on_plateau": -1}, {"plateau_window": 0}, {"plateau_min_delta": 1.0}):
        with pytest.raises(InvalidInputError, match=next(iter(bad))):
            LoraTrainConfig(**bad)


def test_the_auto_choice_is_recorded_in_the_sidecar(trained) -> None:
    bf16_in_hardware = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    training = json.loads(trained.metadata_path.read_text())["training"]
    assert training["precision_requested"] == "auto"
    assert training["precision"] == ("bf16" if bf16_in_hardware else "f32") == trained.precision.name
    assert training["precision_why"].startswith("auto: the CPU has")
    assert training["early_stop"] is None and training["steps"] == training["planned_steps"] == STEPS


def test_bf16_kill_and_resume_equals_straight_bf16_run(dataset: Path, trained, tmp_path: Path) -> None:
    """Forced bf16 (autocast on CPU): a killed and resumed run ends where a straight one does, and the
    LoRA it writes is float32 and loads in diffusers."""
    from diffusers import StableDiffusionPipeline

    from facetron.diffusion.base_model import load_base_model

    class Killed(Exception):
        pass

    def kill_at_12(step: int, loss: float) -> None:
        if step == 12:
            raise Killed

    straight = train_lora(dataset, tmp_path / "straight", user_id="alice", config=config(precision="bf16"),
                          progress=False)
    out = tmp_path / "resumed"
    with pytest.raises(Killed):
        train_lora(dataset, out, user_id="alice", config=config(precision="bf16", checkpoint_every=5),
                   progress=False, callback=kill_at_12)
    resumed = train_lora(dataset, out, user_id="alice", config=config(precision="bf16", checkpoint_every=5),
                         progress=False, resume=True)
    assert resumed.resumed_from == 10 and resumed.losses == straight.losses
    a, b = load_file(str(straight.lora_path)), load_file(str(resumed.lora_path))
    assert a.keys() == b.keys() and {v.dtype for v in b.values()} == {torch.float32}
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst == 0.0, worst
    # bf16 really ran: the losses leave the f32 run's (same seed, data, noise), but stay near them
    gap = float(np.max(np.abs(np.subtract(straight.losses, trained.losses))))
    assert 0 < gap < 0.1, gap
    assert straight.precision.name == "bf16" and straight.metadata["training"]["precision"] == "bf16"

    base = load_base_model()
    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                   unet=base.unet, scheduler=base.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(resumed.lora_path.parent), weight_name=resumed.lora_path.name)
    g = torch.Generator().manual_seed(1)
    x, hidden, t = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g), torch.tensor([100, 700])
    with torch.no_grad():
        assert torch.allclose(pipe.unet(x, t, hidden).sample, resumed.unet(x, t, hidden).sample, atol=1e-5, rtol=0)


def test_plateau_rule_by_hand() -> None:
    from facetron.training.lora_config import PlateauRule

    def stop_step(losses: list[float], patience: int, min_delta: float, window: int) -> int | None:
        rule = PlateauRule(patience, min_delta, window)
        return next((s["step"] for s in map(rule.update, losses) if s is not None), None)

    assert stop_step([1.0] * 20, patience=4, min_delta=0.01, window=3) == 7  # best at step 3 (first full window)
    assert stop_step([1.0 - 0.05 * i for i in range(15)], 3, 0.01, 2) is None  # falls 5%+ a step: never
    # means of 2: 1.0 (s2), 0.995 (s3, < 1% fall: no new best), 0.9 (s4: new best), then flat -> 4 + 3
    assert stop_step([1.0, 1.0, 0.99, 0.81, 0.99, 0.81, 0.99, 0.81, 0.99, 0.81], 3, 0.01, 2) == 7
    rule = PlateauRule(3, 0.01, 2)
    record = rule.replay([1.0] * 6)
    assert record["step"] == 5 and record["smoothed_loss"] == 1.0 and record["best_step"] == 2
    assert "mean of the last 2 steps" in record["rule"] and "for 3 steps" in record["rule"]


def test_early_stop_survives_kill_and_resume(dataset: Path, tmp_path: Path) -> None:
    """min_delta 0.9 is never met: the best is the first full window (step 6), the stop comes at 6 + 10.
    Killed at 12, resumed from the step-10 checkpoint, the rule rebuilt from the saved losses must stop
    at 16 too (without the rebuild it would stop at 10 + 6 + 10 = 26)."""
    class Killed(Exception):
        pass

    def kill_at_12(step: int, loss: float) -> None:
        if step == 12:
            raise Killed

    plateau = dict(steps=40, stop_on_plateau=10, plateau_window=6, plateau_min_delta=0.9, checkpoint_every=5,
                   identity_snapshots=2)
    straight = train_lora(dataset, tmp_path / "straight", user_id="alice", config=config(**plateau), progress=False)
    assert straight.steps == len(straight.losses) == 16 and straight.early_stop["step"] == 16
    assert straight.early_stop["best_step"] == 6
    assert straight.early_stop["smoothed_loss"] == pytest.approx(np.mean(straight.losses[-6:]), rel=1e-12)
    assert [s for s, _ in straight.snapshots] == [16]  # planned at 20 and 40; the stop's step is the last
    meta = json.loads(straight.metadata_path.read_text())
    assert meta["steps"] == 16 and meta["training"]["planned_steps"] == 40
    assert meta["training"]["early_stop"] == straight.early_stop and "for 10 steps" in straight.early_stop["rule"]

    out = tmp_path / "resumed"
    with pytest.raises(Killed):
        train_lora(dataset, out, user_id="alice", config=config(**plateau), progress=False, callback=kill_at_12)
    with pytest.raises(InvalidInputError, match="different config"):  # the rule is part of what must match
        train_lora(dataset, out, user_id="alice", config=config(**dict(plateau, stop_on_plateau=11)), progress=False,
                   resume=True)
    resumed = train_lora(dataset, out, user_id="alice", config=config(**plateau), progress=False, resume=True)
    assert resumed.resumed_from == 10 and resumed.losses == straight.losses
    assert resumed.early_stop == straight.early_stop
    a, b = load_file(str(straight.lora_path)), load_file(str(resumed.lora_path))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0


def test_cli_says_why_training_stopped(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import argparse

    from facetron.cli import train as train_cmd

    parser = argparse.ArgumentParser(prog="facetron")
    train_cmd.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", "lora", str(dataset), "--user", "dora", "--train-steps", "12", "--out",
                              str(tmp_path / "loras"), "--no-progress", "--no-register", "--precision", "f32",
                              "--stop-on-plateau", "2", "--plateau-window", "2", "--plateau-min-delta", "0.9"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "precision f32 (precision='f32' requested)" in out
    assert "stopped early at step 4 of 12" in out and "rule: stop when the smoothed loss (mean of the last 2" in out
    with pytest.raises(InvalidInputError, match="--stop-on-plateau"):  # errors name the flag typed
        train_cmd.run_lora(parser.parse_args(["train", "lora", str(dataset), "--user", "dora", "--out",
                                              str(tmp_path / "x"), "--stop-on-plateau", "-1"]))
