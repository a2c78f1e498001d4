"""Identity LoRA training (FaceChain's recipe) with exact resume.

``train_lora(dataset, "loras/alice.safetensors", user_id="alice")`` trains a
peft LoRA on the UNet attention projections with the DDPM noise-prediction
loss and writes:

* ``loras/alice.safetensors`` — diffusers keys (``unet.…lora_A.weight``) plus
  the adapter metadata (so ``lora_alpha`` survives), loadable with
  ``StableDiffusionPipeline.load_lora_weights``;
* ``loras/alice.json`` — base model + hash, hyper-parameters, loss summary;
* while running, ``loras/alice.ckpt/step-NNNNNN/`` checkpoints (removed once
  the output is written);
* with ``identity_snapshots = N`` (``train lora --select-by-identity N``),
  ``loras/alice.candidates/step-NNNNNN.safetensors``: the LoRA at N evenly
  spaced steps (the last is the final one), kept for
  :mod:`facetron.training.identity_select` to choose from by identity.

Ownership (:meth:`OutputPaths.check_owned`, before any work): the sidecar
names its LoRA file and is that file's ownership marker; the ``.ckpt`` and
``.candidates`` folders carry ``.facetron-artifact``. An existing output
facetron did not write is refused, never overwritten or deleted.

Design choices that make kill + resume equal a straight run bit for bit:

* All per-step randomness (which images, flip, noise, timesteps) comes from
  a ``torch.Generator`` reseeded from ``(seed, step, rank)`` — never from a
  global stream — so step ``s`` draws the same numbers whether or not the
  process restarted before it. Data order is an epoch-wise permutation
  seeded by ``(seed, epoch)``; the flip coin by ``(seed, image, epoch)``.
* The VAE and (by default) the text encoder are frozen, so their outputs are
  computed once: latents are the VAE posterior **mean** x scaling factor
  (deterministic; the posterior std of SD's VAE is tiny, FaceChain's
  ``sample()`` adds next to nothing), for each image and its mirror.
* A checkpoint holds the LoRA weights, AdamW and LR-scheduler states, the
  global RNG states (torch, CUDA, numpy, python), the loss history and the
  step; it is written into a temp folder and renamed. The early stop's state
  (``stop_on_plateau``) is a function of the loss history, rebuilt from it on
  resume, so a resumed run stops at the step a straight one stops at.

Speed: on CPU the forward runs under ``torch.autocast("cpu", bfloat16)`` when
:func:`~facetron.training.lora_config.choose_precision` picks bf16 (the CPU
has AMX / AVX-512 bf16; the choice and why go into the sidecar); LoRA
parameters, gradients and AdamW state stay float32 and the saved LoRA is
float32. AdamW runs fused (``fused=True``: one kernel for all parameters;
measured 3-8% faster per step than the default per-parameter loop on the
tiny model, 2 cores).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from facetron import __version__
from facetron.atomic import ARTIFACT_MARKER, atomic_write_json, check_file_replaceable, owned_file, owned_folder
from facetron.cpu_info import bf16_fast
from facetron.diffusion.base_model import load_base_model, model_hash
from facetron.errors import InvalidInputError
from facetron.training.dataset import CaptionedImages, METADATA_FILE, Row, flip_decision, read_metadata
from facetron.training.checkpoints import (CHECKPOINT_RE, LORA_SUFFIX, checkpoint_dirs, load_checkpoint,
                                            newest_checkpoint, save_checkpoint, snapshot_files)
from facetron.training.lora_config import LoraTrainConfig, PrecisionChoice, choose_precision
from facetron.users import validate_user_id


StepCallback = Callable[[int, float], None]


@dataclass
class TrainResult:
    """What one call of :func:`train_lora` produced."""

    lora_path: Path
    metadata_path: Path
    steps: int  # steps trained (fewer than planned when the early stop ended the run)
    losses: list[float]  # one per step, whole run (including steps before a resume)
    resumed_from: int | None
    seconds: float  # this call only
    steps_per_second: float  # this call only
    metadata: dict = field(default_factory=dict, repr=False)
    unet: torch.nn.Module | None = field(default=None, repr=False)  # the trained peft-adapted UNet
    text_encoder: torch.nn.Module | None = field(default=None, repr=False)
    snapshots: list[tuple[int, Path]] = field(default_factory=list)  # (step, LoRA file): identity candidates
    precision: PrecisionChoice | None = None
    early_stop: dict | None = None  # PlateauRule's stop record (step, smoothed loss, rule) when it ended the run


@dataclass(frozen=True)
class OutputPaths:
    lora: Path
    metadata: Path
    checkpoints: Path
    snapshots: Path

    @classmethod
    def for_user(cls, out_path: str | os.PathLike, user_id: str) -> "OutputPaths":
        """``out_path`` is the ``.safetensors`` file, or a folder that gets ``<user>.safetensors``."""
        out = Path(out_path)
        lora = out if out.suffix == LORA_SUFFIX else out / f"{user_id}{LORA_SUFFIX}"
        if lora.exists() and not lora.is_file():
            raise InvalidInputError(f"out {lora}", "exists and is not a file")
        return cls(lora=lora, metadata=lora.with_suffix(".json"), checkpoints=lora.with_name(f"{lora.stem}.ckpt"),
                   snapshots=lora.with_name(f"{lora.stem}.candidates"))

    def check_owned(self, snapshots: bool = True) -> None:
        """The ownership rule every facetron writer follows, before any work: ``<stem>.safetensors``
        and ``<stem>.json`` are absent or written by facetron (the sidecar names the LoRA), and the
        ``<stem>.ckpt`` / ``<stem>.candidates`` folders are absent, empty or facetron's (hold
        :data:`ARTIFACT_MARKER`). Anything else: InvalidInputError naming the path and the rule."""
        check_file_replaceable(self.lora, "--out")
        check_file_replaceable(self.metadata, "--out")
        claim_folder(self.checkpoints, _is_checkpoint, create=False)
        if snapshots:
            claim_folder(self.snapshots, _is_snapshot, create=False)

    def present(self) -> list[tuple[Path, str | None]]:
        """The outputs that exist: (path, None) when facetron wrote it by the rule of :meth:`check_owned`,
        (path, why not) otherwise. What ``users delete --purge`` removes, or must leave and report."""
        found: list[tuple[Path, str | None]] = []
        for path in (self.lora, self.metadata):
            if path.exists() or path.is_symlink():
                found.append((path, None if owned_file(path) else
                              f"facetron did not write it (no {self.metadata.name} sidecar of facetron's names it)"))
        for path, ours in ((self.checkpoints, _is_checkpoint), (self.snapshots, _is_snapshot)):
            if path.exists() or path.is_symlink():
                found.append((path, None if _folder_is_ours(path, ours) else
                              f"a folder facetron did not make (no {ARTIFACT_MARKER} marker)"))
        return found


def _is_checkpoint(entry: Path) -> bool:
    """A checkpoint folder :func:`save_checkpoint` wrote (its own marker inside)."""
    return bool(CHECKPOINT_RE.match(entry.name)) and owned_folder(entry)


def _is_snapshot(entry: Path) -> bool:
    """An identity candidate ``step-NNNNNN.safetensors`` written by :func:`write_lora_file`."""
    return entry.suffix == LORA_SUFFIX and bool(CHECKPOINT_RE.match(entry.stem)) and entry.is_file() \
        and not entry.is_symlink()


def _folder_is_ours(path: Path, ours: Callable[[Path], bool]) -> bool:
    """A folder facetron made: marked, or left unmarked by an earlier facetron, holding only what ``ours`` accepts."""
    return owned_folder(path) or (path.is_dir() and not path.is_symlink() and all(ours(e) for e in path.iterdir()))


def claim_folder(path: Path, ours: Callable[[Path], bool], create: bool = True) -> Path:
    """``path`` as a folder train lora may write into and later delete: absent (made, with the marker, when
    ``create``), empty, marked :data:`ARTIFACT_MARKER`, or one an earlier facetron run left unmarked that
    holds only entries ``ours`` accepts (marked now). A folder facetron did not make is refused, never
    written into or deleted."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise InvalidInputError(f"--out {path}", "exists and is not a folder facetron made; move it away or choose "
                                                 "another --out (nothing was changed)")
    if path.is_dir() and not _folder_is_ours(path, ours):
        foreign = [e.name for e in sorted(path.iterdir()) if not ours(e)]
        raise InvalidInputError(
            f"--out {path}", f"holds files facetron did not make (no {ARTIFACT_MARKER} marker; e.g. {foreign[0]}): "
                             "train lora never writes into or deletes such a folder; move it away or choose "
                             "another --out (nothing was changed)")
    if create:
        path.mkdir(parents=True, exist_ok=True)
        if not (path / ARTIFACT_MARKER).is_file():
            (path / ARTIFACT_MARKER).write_text("made by facetron (train lora); facetron may remove this folder\n")
    return path


# --------------------------------------------------------------------------- randomness


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, well mixed (numpy SeedSequence)."""
    a, b = np.random.SeedSequence([int(p) for p in parts]).generate_state(2)
    return (int(a) << 31 | int(b)) & ((1 << 63) - 1)


_ORDER, _NOISE, _INIT = 1, 2, 3  # stream ids mixed into derived seeds


def sample_indices(seed: int, step: int, rank: int, batch_size: int, world: int, n: int) -> list[tuple[int, int]]:
    """(image index, epoch) for this rank's batch at ``step``: epoch-wise seeded permutations."""
    out = []
    for j in range(batch_size):
        k = (step * world + rank) * batch_size + j
        epoch, pos = divmod(k, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, _ORDER, epoch)))
        out.append((int(perm[pos]), epoch))
    return out


# --------------------------------------------------------------------------- helpers


def dataset_fingerprint(rows: list[Row], root: Path) -> str:
    """sha256 (16 hex) over metadata.jsonl and every listed image's bytes."""
    h = hashlib.sha256((root / METADATA_FILE).read_bytes())
    for row in rows:
        h.update(row.file_name.encode())
        h.update(row.path.read_bytes())
    return h.hexdigest()[:16]


def loss_summary(losses: list[float]) -> dict:
    """first/last/min of a trailing moving average (window ~ 1/10 of the run, 1..50)."""
    if not losses:
        return {"window": 0, "first": None, "last": None, "min": None, "raw_first": None, "raw_last": None}
    w = max(1, min(50, len(losses) // 10))
    arr = np.asarray(losses, dtype=np.float64)
    ma = np.convolve(arr, np.ones(w) / w, mode="valid")
    return {"window": w, "first": float(ma[0]), "last": float(ma[-1]), "min": float(ma.min()),
            "raw_first": float(arr[0]), "raw_last": float(arr[-1]), "steps": len(losses)}


def device_type(device: str | None) -> str:
    """``cpu`` or ``cuda``: what ``device`` (None = cuda if available) trains on."""
    if device not in (None, "cpu", "cuda"):
        raise InvalidInputError("device", f"must be 'cpu', 'cuda' or None (auto), got {device!r}; "
                                          "pick GPUs with CUDA_VISIBLE_DEVICES / accelerate launch")
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("device", "'cuda' requested but torch sees no CUDA device")
    return "cpu" if device == "cpu" or (device is None and not torch.cuda.is_available()) else "cuda"


def run_precision(config: LoraTrainConfig, kind: str) -> PrecisionChoice:
    """The precision ``config`` trains in on a ``kind`` device (reads the CPU's flags only for cpu + auto)."""
    flags = bf16_fast() if kind == "cpu" and config.precision == "auto" else []
    return choose_precision(config.precision, config.mixed_precision, kind, flags)


def _make_accelerator(kind: str, precision: PrecisionChoice):
    from accelerate import Accelerator

    return Accelerator(cpu=kind == "cpu", mixed_precision=precision.mixed_precision)


def _autocast(accelerator, precision: PrecisionChoice):
    """The context the forward runs in: CPU bf16 autocast, or accelerate's (CUDA mixed precision / none)."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision.cpu_autocast else accelerator.autocast()


@torch.no_grad()
def encode_latents(vae, dataset: CaptionedImages, flips: tuple[bool, ...], device) -> torch.Tensor:
    """VAE posterior mean x scaling factor for every image and flip: [N, len(flips), C, h, w]."""
    out = []
    for i in range(len(dataset)):
        px = torch.stack([dataset.pixel_values(i, f) for f in flips]).to(device, vae.dtype)
        out.append(vae.encode(px).latent_dist.mean * vae.config.scaling_factor)
    return torch.stack(out).float()


def write_lora_file(path: Path, unet, text_encoder=None, text_encoder_config=None) -> Path:
    """Save with ``StableDiffusionPipeline.save_lora_weights`` into a temp folder, then rename to ``path``."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    kwargs = dict(
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
    )
    if text_encoder is not None:
        kwargs["text_encoder_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder))
        kwargs["text_encoder_lora_adapter_metadata"] = text_encoder_config.to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        StableDiffusionPipeline.save_lora_weights(str(tmp), weight_name=path.name, safe_serialization=True, **kwargs)
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def build_sidecar(*, user_id: str, paths: OutputPaths, base, config: LoraTrainConfig, dataset: CaptionedImages,
                  fingerprint: dict, total_steps: int, resolution: int, world: int, device: torch.device,
                  precision: PrecisionChoice, early_stop: dict | None,
                  prediction_type: str, resumed_from: int | None, losses: list[float],
                  reference_embedding: Path | None, trigger_hits: int, seconds: float, seconds_before: float,
                  steps_per_second: float | None) -> dict:
    """The ``<user>.json`` written beside the LoRA: provenance, hyper-parameters, loss summary."""
    te_on = config.train_text_encoder
    return {
        "user_id": user_id,
        "lora_file": paths.lora.name,
        "format": "diffusers StableDiffusionPipeline.save_lora_weights (peft LoRA, adapter metadata included)",
        "base_model": {"path": str(Path(base.path).resolve()), "model_hash": fingerprint["base_model_hash"],
                       "smoke_model": base.is_smoke_model},
        "smoke_model": base.is_smoke_model,
        "note": ("trained on the tiny embedded smoke model: its pictures are not portraits"
                 if base.is_smoke_model else None),
        "trigger_token": config.trigger_token,
        "captions_with_trigger_token": f"{trigger_hits}/{len(dataset)}",
        "rank": config.rank,
        "alpha": config.alpha,
        "steps": len(losses),
        "lr": config.learning_rate,
        "lora": {"rank": config.rank, "alpha": config.alpha, "target_modules": list(config.target_modules),
                 "text_encoder_rank": config.text_encoder_rank,
                 "text_encoder_alpha": config.text_encoder_alpha if te_on else None,
                 "text_encoder_target_modules": list(config.text_encoder_target_modules) if te_on else None},
        "training": {"steps": len(losses), "planned_steps": total_steps, "lr": config.learning_rate,
                     "lr_scheduler": config.lr_scheduler,
                     "lr_warmup_steps": config.lr_warmup_steps, "optimizer": "AdamW",
                     "weight_decay": config.adam_weight_decay, "max_grad_norm": config.max_grad_norm,
                     "batch_size": config.batch_size, "world_size": world, "seed": config.seed,
                     "resolution": resolution, "random_flip": config.random_flip,
                     "mixed_precision": config.mixed_precision if device.type == "cuda" else "no",
                     "precision": precision.name, "precision_requested": config.precision,
                     "precision_why": precision.why, "optimizer_impl": "torch AdamW fused=True",
                     "early_stop": early_stop,
                     "early_stop_rule": config.plateau_rule().rule if config.stop_on_plateau else None,
                     "device": str(device), "latents": "VAE posterior mean x scaling_factor (cached)",
                     "prediction_type": prediction_type, "resumed_from_step": resumed_from},
        "dataset": {"path": str(dataset.root.resolve()), "num_images": len(dataset),
                    "fingerprint": fingerprint["dataset"]},
        "loss": loss_summary(losses),
        "reference_embedding": str(reference_embedding) if reference_embedding is not None else None,
        "facetron_version": __version__,
        "time_s": round(seconds_before + seconds, 3),
        "time_s_this_run": round(seconds, 3),
        "steps_per_second_this_run": round(steps_per_second, 3) if steps_per_second else None,
        "created_unix": int(time.time()),
        "extra": config.extra,
    }


# --------------------------------------------------------------------------- training


def train_lora(
    dataset_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    user_id: str,
    base_model: str | os.PathLike | None = None,
    config: LoraTrainConfig | None = None,
    resume: bool = False,
    device: str | None = None,
    progress: bool = True,
    reference_embedding: str | os.PathLike | None = None,
    callback: StepCallback | None = None,
) -> TrainResult:
    """Train the identity LoRA of ``user_id`` on ``dataset_dir`` and write it to ``out_path``.

    ``out_path``: the ``.safetensors`` file, or a folder (then ``<user>.safetensors``).
    ``base_model``: diffusers SD-1.5-layout folder; None = the tiny embedded default.
    ``resume``: continue from the newest checkpoint in ``<stem>.ckpt/`` (fresh
    start if there is none). Without it, existing checkpoints are an error,
    never silently overwritten. ``callback(step, loss)`` runs after every
    optimizer step (after that step's checkpoint, if any). With
    ``config.stop_on_plateau`` the run may end before its planned steps; the
    LoRA of the last step trained is written and the stop record (step,
    smoothed loss, rule) goes into the result and the sidecar.
    """
    t_start = time.perf_counter()
    user_id = validate_user_id(user_id, name="--user")
    config = config or LoraTrainConfig()
    config.validate()
    kind = device_type(device)
    precision = run_precision(config, kind)  # checked before any work, like every input
    paths = OutputPaths.for_user(out_path, user_id)
    dataset_dir = Path(dataset_dir)
    rows = read_metadata(dataset_dir)  # every dataset error surfaces before anything is written
    snapshot_at = set(config.snapshot_steps(config.resolve_steps(len(rows))))  # checked before any work
    paths.check_owned(snapshots=bool(snapshot_at))  # nothing foreign is overwritten or deleted
    ref_path = None
    if reference_embedding is not None:
        ref_path = Path(reference_embedding)
        if not ref_path.is_file():
            raise InvalidInputError("reference_embedding", f"{ref_path} is not a file")
        ref_path = ref_path.resolve()
    checkpoint = newest_checkpoint(paths.checkpoints) if resume else None
    if not resume and checkpoint_dirs(paths.checkpoints):
        raise InvalidInputError(f"out {paths.lora}", f"{paths.checkpoints} holds checkpoints of an earlier run: "
                                                     "pass --resume to continue it, or delete that folder")
    if not resume and snapshot_files(paths.snapshots):
        raise InvalidInputError(f"out {paths.lora}", f"{paths.snapshots} holds identity candidates of an earlier run: "
                                                     "pass --resume to continue it, or delete that folder")

    claim_folder(paths.checkpoints, _is_checkpoint)
    if snapshot_at:
        claim_folder(paths.snapshots, _is_snapshot)

    from diffusers.optimization import get_scheduler
    from peft import inject_adapter_in_model

    from facetron.progress import progress_bar

    base = load_base_model(base_model)
    accelerator = _make_accelerator(kind, precision)
    dev = accelerator.device
    resolution = config.resolution or base.resolution
    dataset = CaptionedImages(dataset_dir, base.tokenizer, resolution, random_flip=config.random_flip, seed=config.seed)
    total_steps = config.resolve_steps(len(dataset))
    trigger_hits = sum(config.trigger_token in c for c in dataset.captions)

    unet, vae, text_encoder, noise_scheduler = base.unet, base.vae, base.text_encoder, base.scheduler
    vae.to(dev)
    flips = (False, True) if config.random_flip else (False,)
    latents_cache = encode_latents(vae, dataset, flips, dev)
    vae.to("cpu")  # frozen and cached: free accelerator memory
    input_ids = torch.stack([dataset.input_ids(i) for i in range(len(dataset))]).to(dev)

    te_config = config.text_encoder_lora_config() if config.train_text_encoder else None
    # lora_A's gaussian init draws from the global torch RNG: draw it on CPU from a
    # stream seeded by config.seed (forked, so the caller's global state is untouched).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.seed, _INIT))
        unet.add_adapter(config.unet_lora_config())
        if te_config is not None:
            text_encoder = inject_adapter_in_model(te_config, text_encoder)
    unet.to(dev).train()
    text_encoder.to(dev)
    if te_config is not None:
        text_encoder.train()
        hidden_cache = None
    else:
        with torch.no_grad():
            hidden_cache = text_encoder(input_ids)[0].float()
        text_encoder.to("cpu")  # frozen and cached

    modules = {"unet": unet} | ({"text_encoder": text_encoder} if te_config is not None else {})
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.adam_weight_decay, eps=config.adam_epsilon, fused=True)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                 num_training_steps=total_steps)
    if te_config is not None:
        unet, text_encoder, optimizer = accelerator.prepare(unet, text_encoder, optimizer)
    else:
        unet, optimizer = accelerator.prepare(unet, optimizer)
    unwrapped = {k: accelerator.unwrap_model(m) for k, m in modules.items()}

    fingerprint = {"config": config.fingerprint() | {"precision": precision.name}, "total_steps": total_steps,
                   "resolution": resolution, "base_model_hash": model_hash(base.path),
                   "dataset": dataset_fingerprint(rows, dataset_dir), "world_size": accelerator.num_processes}
    losses: list[float] = []
    start_step, resumed_from, seconds_before = 0, None, 0.0
    if checkpoint is not None:
        state = json.loads((checkpoint / "state.json").read_text())
        diff = sorted(k for k in fingerprint if state.get("fingerprint", {}).get(k) != fingerprint[k])
        if diff:
            raise InvalidInputError("--resume", f"checkpoint {checkpoint} was made with a different "
                                                f"{', '.join(diff)}; resume with the same settings, or delete it")
        state = load_checkpoint(checkpoint, unwrapped, optimizer, lr_scheduler)
        start_step, resumed_from = int(state["step"]), int(state["step"])
        losses = [float(x) for x in state["losses"]][:start_step]
        seconds_before = float(state.get("seconds", 0.0))
    plateau = config.plateau_rule()
    if plateau is not None:
        plateau.replay(losses)  # the early stop's state at start_step, as the straight run had it
    early_stop = None

    world, rank, bsz = accelerator.num_processes, accelerator.process_index, config.batch_size
    n_train_t = noise_scheduler.config.num_train_timesteps
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise InvalidInputError("--base-model", f"scheduler prediction_type {prediction_type!r} is not supported "
                                                "(epsilon or v_prediction)")
    if resume and checkpoint is None and progress and accelerator.is_local_main_process:
        print(f"[train] --resume: no checkpoint in {paths.checkpoints}, starting from step 0", flush=True)
    t_loop = time.perf_counter()
    bar = progress_bar(total=total_steps, initial=start_step, desc=f"lora {user_id}", unit="step", dynamic_ncols=True,
                       enabled=progress and accelerator.is_local_main_process)
    with bar:
        for step in range(start_step, total_steps):
            picks = sample_indices(config.seed, step, rank, bsz, world, len(dataset))
            idx = torch.tensor([i for i, _ in picks], device=dev)
            flip_col = torch.tensor([int(config.random_flip and flip_decision(config.seed, i, e)) for i, e in picks],
                                    device=dev)
            latents = latents_cache[idx, flip_col]
            g = torch.Generator().manual_seed(derive_seed(config.seed, _NOISE, step, rank))
            noise = torch.randn(latents.shape, generator=g).to(dev)
            timesteps = torch.randint(0, n_train_t, (bsz,), generator=g).to(dev)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            if prediction_type == "epsilon":
                target = noise
            else:
                target = noise_scheduler.get_velocity(latents, noise, timesteps)
            with _autocast(accelerator, precision):
                hidden = hidden_cache[idx] if hidden_cache is not None else text_encoder(input_ids[idx])[0]
                pred = unet(noisy, timesteps, hidden).sample
            loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
            accelerator.backward(loss)
            if accelerator.sync_gradients and config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            loss_value = float(accelerator.reduce(loss.detach(), reduction="mean").item())
            losses.append(loss_value)
            done = step + 1
            early_stop = plateau.update(loss_value) if plateau is not None else None
            recent = losses[-10:]
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}",
                            **({"stopped": "loss plateau"} if early_stop else {}))
            bar.update(1)
            if done % config.checkpoint_every == 0 and done < total_steps and early_stop is None:
                if accelerator.is_main_process:
                    save_checkpoint(paths.checkpoints, done, unwrapped, optimizer, lr_scheduler,
                                    {"fingerprint": fingerprint, "losses": losses, "total_steps": total_steps,
                                     "seconds": seconds_before + time.perf_counter() - t_start,
                                     "sampler": "per-step torch.Generator seeded from (seed, step, rank)"},
                                    config.keep_checkpoints)
                accelerator.wait_for_everyone()
            if (done in snapshot_at or (snapshot_at and early_stop)) and accelerator.is_main_process:
                path = paths.snapshots / f"step-{done:06d}{LORA_SUFFIX}"  # the early stop's step: the last one
                write_lora_file(path, unwrapped["unet"], unwrapped.get("text_encoder"), te_config)
            if callback is not None:
                callback(done, loss_value)
            if early_stop is not None:
                break
    loop_seconds = time.perf_counter() - t_loop
    steps_run = len(losses) - start_step

    accelerator.wait_for_everyone()
    unet_out = unwrapped["unet"].eval()
    te_out = unwrapped.get("text_encoder")
    if te_out is not None:
        te_out.eval()
    seconds = time.perf_counter() - t_start
    metadata = build_sidecar(
        user_id=user_id, paths=paths, base=base, config=config, dataset=dataset, fingerprint=fingerprint,
        total_steps=total_steps, resolution=resolution, world=world, device=dev, precision=precision,
        early_stop=early_stop, prediction_type=prediction_type,
        resumed_from=resumed_from, losses=losses, reference_embedding=ref_path, trigger_hits=trigger_hits,
        seconds=seconds, seconds_before=seconds_before,
        steps_per_second=steps_run / loop_seconds if steps_run and loop_seconds > 0 else None,
    )
    if accelerator.is_main_process:
        paths.check_owned(snapshots=False)  # nothing foreign appeared while we trained
        atomic_write_json(paths.metadata, metadata)  # the sidecar first: it names (owns) the LoRA file
        write_lora_file(paths.lora, unet_out, te_out, te_config)
        if owned_folder(paths.checkpoints):  # ours (claimed above): never a folder facetron did not make
            shutil.rmtree(paths.checkpoints, ignore_errors=True)
    accelerator.wait_for_everyone()
    return TrainResult(lora_path=paths.lora, metadata_path=paths.metadata, steps=len(losses), losses=losses,
                       resumed_from=resumed_from, seconds=seconds,
                       steps_per_second=steps_run / loop_seconds if loop_seconds > 0 else 0.0,
                       metadata=metadata, unet=unet_out, text_encoder=te_out,
                       snapshots=snapshot_files(paths.snapshots) if snapshot_at else [],
                       precision=precision, early_stop=early_stop)
