"""``facetron train …``: training subcommands.

``train`` holds nested subcommands so each training stage registers next to
the others (``lora`` today; ``prepare`` — photos to dataset — lands here too)::

    facetron train lora DATASET --user alice [--base-model DIR] [--train-steps N] ...

Outputs default under the data root (``$FACETRON_HOME/prepared/<user>``,
``$FACETRON_HOME/loras``), never into the checkout.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from facetron.cli.options import add_users_dir, under_data_root
from facetron.cli.users import ensure_token
from facetron.paths import HOME_SHOWN

NO_PROGRESS_HELP = "no progress output (the same as --progress off)"
#: LoraTrainConfig / train_lora argument -> the `train lora` flag, so errors name what the user typed
LORA_FLAGS = {"steps": "--train-steps", "rank": "--rank", "alpha": "--alpha", "learning_rate": "--lr",
              "text_encoder_rank": "--text-encoder-rank", "batch_size": "--batch-size", "seed": "--seed",
              "checkpoint_every": "--checkpoint-every", "mixed_precision": "--mixed-precision",
              "trigger_token": "--trigger-token", "identity_snapshots": "--select-by-identity",
              "reference_embedding": "--reference-embedding", "device": "--device", "precision": "--precision",
              "stop_on_plateau": "--stop-on-plateau", "plateau_min_delta": "--plateau-min-delta",
              "plateau_window": "--plateau-window"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="prepare training data and train the identity LoRA")
    stages = p.add_subparsers(dest="train_command", required=True, metavar="STAGE")
    add_prepare_parser(stages)
    add_lora_parser(stages)


def add_prepare_parser(stages: argparse._SubParsersAction) -> None:
    from facetron.training.preprocess import PrepareConfig

    d = PrepareConfig()
    p = stages.add_parser(
        "prepare",
        help="photos of one person -> training dataset, reference embedding, template face, report",
        description="Detect, filter (one dominant face, quality, identity consistency), rotate upright, crop, "
                    "optionally retouch, and caption the photos. Writes <out>/dataset/ (images + metadata.jsonl), "
                    "reference_embedding.npy, template.png, report.json and contact_sheet.png, and registers the "
                    "user's reference embedding and template face in the user registry.",
    )
    p.add_argument("photos", type=Path, metavar="PHOTOS_DIR", help="folder of photos of one person")
    p.add_argument("--user", required=True, help="user id (1-64 of A-Z a-z 0-9 _ -)")
    p.add_argument("--out", type=Path, default=None, help=f"output folder (default: {HOME_SHOWN}/prepared/<user>)")
    p.add_argument("--base-model", type=Path, default=None,
                   help="the resolution follows this model (default: the tiny embedded smoke model, 128 px)")
    p.add_argument("--resolution", type=int, default=None, help="crop size in px (default: the base model's)")
    p.add_argument("--attr", action="append", default=[], metavar="KEY=VALUE",
                   help="attribute for captions, e.g. --attr gender=woman --attr age=30s")
    p.add_argument("--attr-weights", type=Path, default=None,
                   help="FairFace-style ResNet34 weights (.pt/.safetensors) to predict attributes instead")
    p.add_argument("--min-photos", type=int, default=d.min_photos, help="fail below this many usable photos")
    p.add_argument("--white-background", action="store_true", help="paint everything but the head white")
    p.add_argument("--smooth-skin", action="store_true", help="edge-preserving skin smoothing")
    p.add_argument("--trigger-token", default=d.trigger_token, help="the token the captions use for the person")
    add_users_dir(p)
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    p.set_defaults(func=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    import json

    from facetron.faces.attributes import FairFaceAttributes, UserAttributes, parse_attr_flags
    from facetron.training.preprocess import PrepareConfig, prepare_photos, register_user
    from facetron.users import UserRegistry, default_root, validate_user_id

    user = validate_user_id(args.user, "--user")
    if args.attr and args.attr_weights:
        from facetron.errors import InvalidInputError

        raise InvalidInputError("--attr/--attr-weights", "give attributes by hand or by weights, not both")
    attributes = FairFaceAttributes(args.attr_weights) if args.attr_weights else UserAttributes(parse_attr_flags(args.attr))
    resolution = args.resolution
    if resolution is None:
        from facetron.diffusion.base_model import check_layout, ensure_tiny_model
        from facetron.diffusion.model_spec import TINY

        if args.base_model is None:
            ensure_tiny_model()
            resolution = TINY.resolution
        else:
            cfg = json.loads((check_layout(args.base_model) / "unet" / "config.json").read_text())
            vae = json.loads((args.base_model / "vae" / "config.json").read_text())
            resolution = int(cfg["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    config = PrepareConfig(resolution=resolution, min_photos=args.min_photos, white_background=args.white_background,
                           smooth_skin=args.smooth_skin, trigger_token=args.trigger_token)
    out = args.out or under_data_root("prepared", user)
    result = prepare_photos(args.photos, out, config, attributes, progress=not args.no_progress)
    registry = UserRegistry(args.users_dir or default_root())
    register_user(registry, user, result, args.trigger_token)
    ensure_token(registry, user)  # a new user's token, kept in the operator's token store
    kept = len(result.kept)
    print(f"prepared {kept}/{len(result.photos)} photos of {user!r} at {resolution}px -> {out}")
    for p in result.photos:
        print(f"  {'kept   ' if p.kept else 'dropped'} {p.file}{'' if p.kept else ': ' + p.reason}")
    print(f"dataset: {result.dataset_dir}  report: {out / 'report.json'}  contact sheet: {out / 'contact_sheet.png'}")
    print(f"registered user {user!r} in {registry.root}")
    return 0


def add_lora_parser(stages: argparse._SubParsersAction) -> None:
    from facetron.training.lora_config import DEFAULT_TRIGGER_TOKEN, MIXED_PRECISION, PRECISIONS, LoraTrainConfig

    d = LoraTrainConfig()
    p = stages.add_parser(
        "lora",
        help="train a user's identity LoRA on a prepared dataset",
        description="Train the identity LoRA (FaceChain defaults: UNet rank 4, alpha 32, lr 1.5e-4 cosine, "
                    "min(200 x photos, 800) steps) and write <out>/<user>.safetensors + <user>.json.",
    )
    p.add_argument("dataset", type=Path, metavar="DATASET", help="folder with images and metadata.jsonl")
    p.add_argument("--user", required=True, help="user id (1-64 of A-Z a-z 0-9 _ -)")
    p.add_argument("--base-model", type=Path, default=None,
                   help="SD-1.5-layout diffusers folder (default: the tiny embedded smoke model)")
    p.add_argument("--out", type=Path, default=under_data_root("loras"), help="output folder (default: %(default)s)")
    p.add_argument("--train-steps", type=int, default=None,
                   help="training steps (default: min(200 x photos, 800))")
    p.add_argument("--rank", type=int, default=d.rank, help="UNet LoRA rank (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=d.alpha, help="UNet LoRA alpha (default: %(default)s)")
    p.add_argument("--text-encoder-rank", type=int, default=d.text_encoder_rank,
                   help="text encoder LoRA rank; 0 keeps it frozen (default: %(default)s; FaceChain uses 32 when on)")
    p.add_argument("--lr", type=float, default=d.learning_rate, help="learning rate (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per-device batch size (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of all training randomness (default: %(default)s)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="write a resumable checkpoint every K steps (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of this output")
    p.add_argument("--mixed-precision", choices=MIXED_PRECISION, default=d.mixed_precision,
                   help="CUDA only; the CPU follows --precision (default: %(default)s)")
    p.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="CPU training precision: bf16 (autocast; LoRA weights and optimizer stay float32), f32, or "
                        "auto: bf16 where the CPU has amx_bf16 or avx512_bf16, else f32; the choice and why go into "
                        "<user>.json (default: %(default)s)")
    p.add_argument("--stop-on-plateau", type=int, default=d.stop_on_plateau, metavar="PATIENCE",
                   help="end training early when the smoothed loss has not improved by --plateau-min-delta for "
                        "PATIENCE steps; 0 = off, train every step (default: %(default)s)")
    p.add_argument("--plateau-min-delta", type=float, default=d.plateau_min_delta,
                   help="with --stop-on-plateau: the relative fall of the smoothed loss that counts as an "
                        "improvement (default: %(default)s)")
    p.add_argument("--plateau-window", type=int, default=d.plateau_window,
                   help="with --stop-on-plateau: the smoothed loss is the mean of this many last step losses "
                        "(default: %(default)s)")
    p.add_argument("--trigger-token", default=DEFAULT_TRIGGER_TOKEN,
                   help="the token the captions use for the person (recorded in the sidecar; default: %(default)s)")
    p.add_argument("--reference-embedding", type=Path, default=None,
                   help="the user's reference face embedding (.npy), recorded in the sidecar")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    add_users_dir(p)
    p.add_argument("--no-register", action="store_true", help="do not install the LoRA into the user registry")
    p.add_argument("--select-by-identity", type=int, default=None, metavar="N",
                   help="keep the LoRA at N evenly spaced steps, render fixed pre-fusion samples with each, score "
                        "them against the user's reference embedding (--reference-embedding, else the registry's) "
                        "and install the best; writes identity_selection.json/.md/.png beside the LoRA")
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    p.set_defaults(func=run_lora)


def _selection_reference(args: argparse.Namespace, registry):
    """The reference embedding identity selection scores against (checked before training)."""
    import numpy as np

    from facetron.errors import InvalidInputError

    if args.reference_embedding is not None:
        if not Path(args.reference_embedding).is_file():
            raise InvalidInputError("--reference-embedding", f"{args.reference_embedding} is not a file")
        return np.load(args.reference_embedding, allow_pickle=False).astype(np.float32).reshape(1, -1)
    if not registry.exists(args.user):
        raise InvalidInputError("--select-by-identity", f"needs the user's reference embedding: pass "
                                                        f"--reference-embedding FILE, or register {args.user!r} first "
                                                        "(facetron train prepare)")
    return registry.reference_embedding(args.user)


def run_lora(args: argparse.Namespace) -> int:
    from facetron.training.lora_config import LoraTrainConfig
    from facetron.training.train_lora import train_lora
    from facetron.users import UserRegistry, default_root, validate_user_id

    validate_user_id(args.user, "--user")
    registry = UserRegistry(args.users_dir or default_root())
    reference = None
    if args.select_by_identity is not None:
        from facetron.training.identity_select import check_candidates_count

        check_candidates_count(args.select_by_identity)
        reference = _selection_reference(args, registry)
    from facetron.errors import InvalidInputError

    try:
        config = LoraTrainConfig(
            rank=args.rank, alpha=args.alpha, text_encoder_rank=args.text_encoder_rank, learning_rate=args.lr,
            steps=args.train_steps, batch_size=args.batch_size, seed=args.seed,
            checkpoint_every=args.checkpoint_every, mixed_precision=args.mixed_precision,
            trigger_token=args.trigger_token, identity_snapshots=args.select_by_identity or 0,
            precision=args.precision, stop_on_plateau=args.stop_on_plateau,
            plateau_min_delta=args.plateau_min_delta, plateau_window=args.plateau_window,
        )
        result = train_lora(
            args.dataset, args.out, user_id=args.user, base_model=args.base_model, config=config, resume=args.resume,
            device=args.device, progress=not args.no_progress, reference_embedding=args.reference_embedding,
        )
    except InvalidInputError as err:  # name the flag the user typed
        if err.input_name in LORA_FLAGS:
            raise InvalidInputError(LORA_FLAGS[err.input_name], err.rule) from None
        raise
    loss = result.metadata["loss"]
    print(f"[train] {result.steps} steps ({result.steps_per_second:.2f} steps/s this run); "
          f"loss (moving avg, window {loss['window']}) {loss['first']:.4f} -> {loss['last']:.4f}; "
          f"precision {result.precision.name} ({result.precision.why})")
    if result.early_stop is not None:
        stop = result.early_stop
        print(f"[train] stopped early at step {stop['step']} of {result.metadata['training']['planned_steps']}: "
              f"smoothed loss {stop['smoothed_loss']:.4f}, best {stop['best_smoothed_loss']:.4f} at step "
              f"{stop['best_step']}; rule: {stop['rule']}")
    if result.metadata.get("smoke_model"):
        print("[train] note: trained on the tiny embedded smoke model; its pictures are not portraits")
    if reference is not None:
        _select(args, result, reference, registry)
    print(f"[train] LoRA: {result.lora_path}")
    print(f"[train] metadata: {result.metadata_path}")
    if not args.no_register:
        registry.install_lora(args.user, result.lora_path, result.metadata_path)
        print(f"[train] registered the LoRA for {args.user!r} in {registry.root} (served by the runtime-LoRA unet)")
    return 0


def _select(args: argparse.Namespace, result, reference, registry) -> None:
    """--select-by-identity: score the kept candidates, make the best the output LoRA."""
    from facetron.client.grid import draw_grid
    from facetron.diffusion.base_model import load_base_model
    from facetron.faces.detector import FaceDetector
    from facetron.faces.embedder import FaceEmbedder
    from facetron.pipeline.net_io import pack_detections
    from facetron.training.identity_select import (
        SampleSpec, install_selection, lora_renderer, select_by_identity, write_selection,
    )
    from facetron.users import DEFAULT_SUBJECT

    base = load_base_model(args.base_model)
    subject = registry.identity_text(args.user)[1] if registry.exists(args.user) else DEFAULT_SUBJECT
    spec = SampleSpec()
    detector, embedder = FaceDetector(), FaceEmbedder()
    print(f"[train] choosing among {len(result.snapshots)} checkpoints by identity "
          f"({len(spec.styles)} prompts x {spec.seeds} seeds each, pre-fusion) ...", flush=True)
    selection = select_by_identity(
        result.snapshots, reference, lora_renderer(base, spec, args.trigger_token, subject),
        lambda images: pack_detections(detector.detect_batch(list(images))), embedder.embed, spec,
        smoke_model=base.is_smoke_model,
    )
    files = write_selection(selection, result.lora_path.parent, draw_grid)
    install_selection(selection, result.lora_path, result.metadata_path)
    for i, row in enumerate(selection.rows):
        mean = "-" if row.mean_similarity is None else f"{row.mean_similarity:.4f}"
        print(f"[train]   step {row.step:>6}: one face {row.one_face}/{row.samples}, mean similarity {mean}, "
              f"score {row.score:.4f}{'  <- selected' if i == selection.best else ''}")
    print(f"[train] note: {selection.note()}")
    print(f"[train] identity table: {files['json']} / {files['markdown']}; samples: {files.get('contact_sheet')}")
