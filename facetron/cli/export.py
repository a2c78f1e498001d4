"""``facetron export merge|onnx|validate|trt``: from a LoRA to servable model files.

* ``merge``    fuse face (+ style) LoRA into the base -> diffusers model folder
* ``onnx``     export text_encoder / unet / vae_decoder / vae_encoder (+ the
               runtime-LoRA UNet) to ONNX, optionally merging LoRAs first
* ``validate`` ONNX Runtime vs torch on seeded inputs -> validation.json
* ``trt``      TensorRT engines (GPU hosts), or the equivalent trtexec lines

Other parts add sibling subcommands through :func:`add_subcommand`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from facetron.cli.options import add_runtime_precision, add_users_dir, under_data_root
from facetron.contract import (DEFAULT_DISTILL_WEIGHT, DEFAULT_NET_RUNTIME, DEFAULT_STYLE_WEIGHT, DEFAULT_W_FACE,
                               IDENTITY_MODES, INT8_MODES)
from facetron.export.model_configs import TARGETS

EXPORT_SUBPARSERS: list[argparse._SubParsersAction] = []


def _lora_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--base-model", type=Path, default=None,
                   help="diffusers SD-1.5-layout folder (default: the tiny embedded smoke model)")
    p.add_argument("--face-lora", type=Path, required=required, help="the user's identity LoRA (.safetensors)")
    p.add_argument("--style-lora", type=Path, default=None, help="optional style LoRA (.safetensors)")
    p.add_argument("--w-face", type=float, default=DEFAULT_W_FACE, help="face LoRA weight")
    p.add_argument("--w-style", type=float, default=DEFAULT_STYLE_WEIGHT, help="style LoRA weight")


def add_parser(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Register ``export`` and its nested subcommands; returns the nested subparsers."""
    p = sub.add_parser("export", help="merge LoRAs, export ONNX, validate, build TensorRT engines")
    nested = p.add_subparsers(dest="export_command", required=True, metavar="STEP")
    EXPORT_SUBPARSERS.append(nested)

    m = nested.add_parser("merge", help="fuse face (+ style) LoRA into the base model -> model folder")
    _lora_args(m, required=True)
    m.add_argument("--out", type=Path, required=True, help="output model folder (diffusers layout)")
    m.set_defaults(func=run_merge)

    o = nested.add_parser("onnx", help="export the nets to ONNX (merging LoRAs first if given)")
    _lora_args(o, required=False)
    o.add_argument("--out", type=Path, required=True, help="output folder (one subfolder per model)")
    o.add_argument("--models", default="text_encoder,unet,vae_decoder,vae_encoder",
                   help="comma-separated subset of text_encoder,unet,vae_decoder,vae_encoder")
    o.add_argument("--fp16", action="store_true", help="half-precision weights (for GPU runtimes); I/O stays FP32")
    o.add_argument("--opset", type=int, default=17, help="ONNX opset version")
    o.add_argument("--runtime-lora-rank", type=int, default=0,
                   help="also export unet_lora/, the runtime-LoRA UNet with this LoRA rank (0 = no)")
    o.set_defaults(func=run_onnx)

    v = nested.add_parser("validate", help="compare ONNX Runtime with torch; writes validation.json")
    v.add_argument("--onnx-dir", type=Path, required=True, help="an `export onnx` output folder")
    v.add_argument("--base-model", type=Path, default=None, help="override the base recorded in the export manifest")
    v.add_argument("--models", default=None, help="comma-separated subset (default: all in the export)")
    v.add_argument("--batch", type=int, default=2, help="batch size of the seeded test inputs")
    v.add_argument("--seed", type=int, default=0, help="seed of the test inputs")
    v.add_argument("--report", type=Path, default=None, help="JSON report path (default: <onnx-dir>/validation.json)")
    v.set_defaults(func=run_validate)

    t = nested.add_parser("trt", help="build TensorRT engines (fp16, batch 1-4, 512/768 px; UNet refittable)")
    t.add_argument("--onnx-dir", type=Path, required=True, help="an `export onnx` output folder")
    t.add_argument("--out", type=Path, default=None, help="engine folder (default: --onnx-dir)")
    t.add_argument("--models", default=None, help="comma-separated subset (default: all in the export)")
    t.add_argument("--print-commands", action="store_true", help="only print the equivalent trtexec lines")
    t.set_defaults(func=run_trt)

    r = nested.add_parser("repository", help="assemble a servable Triton model repository (cpu | gpu)")
    r.add_argument("--target", choices=TARGETS, default="cpu", help="where the repository is served")
    r.add_argument("--out", type=Path, default=under_data_root("model_repository"),
                   help="the repository folder to write")
    r.add_argument("--base-model", type=Path, default=None,
                   help="SD-1.5-layout folder for the diffusion models (default: the tiny embedded smoke model)")
    r.add_argument("--faces-only", action="store_true", help="tokenizer + face models only (no diffusion export)")
    r.add_argument("--lora-rank", type=int, default=16, help="rank of the runtime-LoRA UNet (face + style ranks)")
    r.add_argument("--tiny-vae", type=Path, default=None, metavar="DIR",
                   help="a diffusers AutoencoderTiny folder (TAESD weights you have, e.g. madebyollin/taesd for "
                        "SD 1.x) served beside the full VAE as vae_decoder_tiny / vae_encoder_tiny, chosen per "
                        "request (generate --vae tiny); its latents must match the base model's (default: none)")
    r.add_argument("--distill-lora", type=Path, default=None, metavar="FILE",
                   help="a distillation LoRA you have for the base model (LCM-LoRA, TCD-LoRA, Hyper-SD; diffusers or "
                        "kohya .safetensors, UNet layers only): merged into a copy of the base UNet served as "
                        "unet_fewstep, which requests with a few-step scheduler use (generate --scheduler lcm "
                        "--steps 4 --guidance 1); users' LoRAs stack on it at run time (default: none)")
    r.add_argument("--distill-weight", type=float, default=DEFAULT_DISTILL_WEIGHT, metavar="W",
                   help=f"weight the distillation LoRA is merged at, in (0, 2] (default {DEFAULT_DISTILL_WEIGHT:g})")
    r.add_argument("--controlnet", type=Path, default=None, metavar="DIR",
                   help="a diffusers ControlNetModel folder you have for the base model (e.g. an SD-1.5 canny "
                        "ControlNet; safetensors): served as controlnet, with the unet's graph that takes its "
                        "residuals, for template mode with control (generate --template F --control canny); its "
                        "blocks must match the base model's UNet (default: none)")
    r.add_argument("--inpaint-unet", type=Path, default=None, metavar="DIR",
                   help="a diffusers UNet2DConditionModel folder with the inpainting layout you have for the base "
                        "model (e.g. the unet folder of an SD-1.5 inpainting model: 9 input channels, safetensors): "
                        "served as unet_inpaint, the UNet every template-mode request then denoises on (the mask and "
                        "the masked template's latent as extra channels); users' and styles' LoRAs apply, step "
                        "caching and --controlnet's control do not (default: none)")
    add_users_dir(r, "user registry the served models read (default: $FACETRON_USERS_DIR at serve time, else "
                     "$FACETRON_HOME/users)")
    r.add_argument("--identity-mode", choices=IDENTITY_MODES, default=IDENTITY_MODES[0],
                   help="runtime_lora: one UNet + LoRA bank (scalable default); merged: one UNet per user "
                        "(add users with `export add-user`; serve with --model-control explicit)")
    add_runtime_precision(
        r, "cpu target: runtime of text_encoder/unet/vae_* (default auto: measure each net briefly on "
           "this machine at the served shapes and keep the fastest within tolerance, recorded in "
           "runtime_choice.json in the repository; onnxruntime is the validated reference; gpu target: "
           f"{DEFAULT_NET_RUNTIME})",
        "cpu target: f32 | bf16 (OpenVINO nets in bf16) | auto (default with --cpu-runtime auto, else f32: "
        "OpenVINO bf16 is a candidate, eligible within torch's own bf16 deviation; fast on CPUs "
        "with AMX); f32 keeps every net within the fp32 validation tolerance", default=None)
    r.add_argument("--int8", choices=INT8_MODES, default=INT8_MODES[0],
                   help="cpu target: serve the UNet (and unet_fewstep with --distill-lora, on its own 4-step path) as "
                        "int8 OpenVINO IRs calibrated on real denoising trajectories "
                        "(weights | full | hybrid; default off: on the measured models full int8 deviates ~4x more "
                        "than bf16); its deviation is written beside it (int8/deviation.json)")
    r.add_argument("--remeasure", action="store_true",
                   help="--cpu-runtime auto: measure every net again instead of reusing a choice kept from an earlier "
                        "assembly on this kind of machine (same CPU model and flags, threads, runtime versions, "
                        "precision mode and graph architecture; kept under $FACETRON_HOME/cache/runtime_choice), "
                        "and keep the new measurements")
    r.set_defaults(func=run_repository)

    u = nested.add_parser("add-user", help="merged mode: add a user's merged UNet to an assembled repository")
    u.add_argument("--repo", type=Path, required=True, help="an assembled repository (--identity-mode merged)")
    u.add_argument("--user", required=True, help="registered user id whose LoRA is fused")
    add_users_dir(u)
    u.add_argument("--base-model", type=Path, default=None,
                   help="SD-1.5-layout folder the LoRA is fused into (default: the tiny embedded smoke model)")
    u.add_argument("--style", default=None, help="a registered style whose LoRA is fused too (`facetron styles list`)")
    u.add_argument("--style-lora", type=Path, default=None, help="or: a style LoRA file fused at --w-style")
    u.add_argument("--w-face", type=float, default=DEFAULT_W_FACE, help="face LoRA weight")
    u.add_argument("--w-style", type=float, default=DEFAULT_STYLE_WEIGHT, help="style LoRA weight")
    u.add_argument("--target", choices=TARGETS, default="cpu", help="the repository's target")
    u.set_defaults(func=run_add_user)
    _add_refit_parser(nested)
    return nested


def run_add_user(args: argparse.Namespace) -> int:
    from facetron.export.repository import add_merged_user
    from facetron.users import default_root, validate_user_id

    user = validate_user_id(args.user, "--user")
    path = add_merged_user(args.repo, user, args.users_dir or default_root(), args.base_model, args.style_lora,
                           args.w_face, args.w_style, args.target, style=args.style)
    print(f"[export] merged UNet of {user!r} -> {path} (a server with explicit model control loads it on first use)")
    return 0


def _add_refit_parser(nested: argparse._SubParsersAction) -> None:
    f = nested.add_parser("refit", help="merged mode, gpu: a user's UNet engine as a refit of the repository's "
                                        "refit-enabled engine (seconds, not a build); without TensorRT the ORT "
                                        "variant")
    f.add_argument("--repo", type=Path, required=True, help="an assembled gpu repository")
    f.add_argument("--user", required=True, help="registered user id whose LoRA is fused")
    add_users_dir(f)
    f.add_argument("--style", default=None, help="a registered style whose LoRA is fused too (`facetron styles list`)")
    f.add_argument("--base-model", type=Path, default=None,
                   help="the base model (default: the one the repository was assembled from, its model_info.json)")
    f.set_defaults(func=run_refit)


def run_refit(args: argparse.Namespace) -> int:
    """Where TensorRT imports: ``unet_user_<id>/1/model.plan`` = the repository's refit-enabled UNet engine
    (``unet_refit.plan``, built on first use) refitted with the user's merged weights. Elsewhere the one-line
    reason and the ORT variant (as ``add-user --target gpu``). Loaded like any merged user (explicit model control)."""
    from facetron import contract
    from facetron.errors import InvalidInputError
    from facetron.export.repository import add_merged_user
    from facetron.users import default_root, validate_user_id

    user = validate_user_id(args.user, "--user")
    base_model = args.base_model
    info_path = args.repo / contract.PORTRAIT_GENERATOR.name / contract.VERSION_FOLDER / contract.MODEL_INFO
    if base_model is None and info_path.is_file():  # refit the base the repository serves, not the default
        info = json.loads(info_path.read_text())
        if not info.get("is_smoke_model"):
            base_model = Path(info["path"])
            if not base_model.is_dir():
                raise InvalidInputError("--base-model", f"{args.repo} was assembled from {base_model}, which is not on "
                                                        "this machine: give --base-model")
    path = add_merged_user(args.repo, user, args.users_dir or default_root(), base_model, target="gpu",
                           style=args.style, refit=True)
    print(f"[export refit] merged UNet of {user!r} -> {path} (a server with explicit model control loads it on first "
          "use)")
    return 0


def run_repository(args: argparse.Namespace) -> int:
    from facetron.errors import InvalidInputError
    from facetron.export.model_configs import models_for
    from facetron.export.diffusion_source import DiffusionSource
    from facetron.export.repository import RUNTIME_CHOICE_FILE, assemble_repository

    if args.faces_only and args.tiny_vae is not None:
        raise InvalidInputError("--tiny-vae", "serves a diffusion model's autoencoder: not with --faces-only")
    if args.faces_only and args.distill_lora is not None:
        raise InvalidInputError("--distill-lora", "serves a diffusion model's few-step UNet: not with --faces-only")
    if args.distill_lora is None and args.distill_weight != DEFAULT_DISTILL_WEIGHT:
        raise InvalidInputError("--distill-weight", "is the weight of --distill-lora: give the LoRA file too")
    if args.faces_only and args.controlnet is not None:
        raise InvalidInputError("--controlnet", "serves a diffusion model's ControlNet: not with --faces-only")
    if args.faces_only and args.inpaint_unet is not None:
        raise InvalidInputError("--inpaint-unet", "serves a diffusion model's inpainting UNet: not with --faces-only")
    diffusion = None if args.faces_only else DiffusionSource(base_model=args.base_model, lora_rank=args.lora_rank,
                                                             tiny_vae=args.tiny_vae, distill_lora=args.distill_lora,
                                                             distill_weight=args.distill_weight,
                                                             controlnet=args.controlnet,
                                                             inpaint_unet=args.inpaint_unet)
    cpu = args.target == "cpu"
    cpu_runtime = args.cpu_runtime or ("auto" if cpu else DEFAULT_NET_RUNTIME)
    precision = args.precision or ("auto" if cpu_runtime == "auto" and cpu else "f32")
    if args.remeasure and (cpu_runtime != "auto" or diffusion is None):
        raise InvalidInputError("--remeasure", "measures the nets again for --cpu-runtime auto (cpu target, with the "
                                               "diffusion models)")
    out = assemble_repository(args.target, args.out, diffusion=diffusion, users_dir=args.users_dir,
                              identity_mode=args.identity_mode, cpu_runtime=cpu_runtime, precision=precision,
                              int8=args.int8, remeasure=args.remeasure)
    names = [m.name for m in models_for(args.target, diffusion=diffusion is not None,
                                        tiny_vae=args.tiny_vae is not None, fewstep=args.distill_lora is not None,
                                        inpaint=args.inpaint_unet is not None)]
    names += ["controlnet"] if diffusion is not None and args.controlnet is not None else []
    print(f"[export] {args.target} repository with {len(names)} models -> {out}: {', '.join(names)}")
    choice = out / RUNTIME_CHOICE_FILE
    if choice.is_file():
        recorded = json.loads(choice.read_text())
        runtimes, precisions = recorded["runtimes"], recorded.get("precisions") or {}
        print(f"[export] net runtimes ({cpu_runtime}, precision {precision}): "
              + ", ".join(f"{k}={v}" + (f" {precisions[k]}" if precisions.get(k, "f32") != "f32" else "")
                          for k, v in runtimes.items()) + f" (see {choice})")
    if args.target == "gpu":
        print("[export] note: the gpu target is written for the NGC tritonserver container; it was not served here")
    return 0


def add_subcommand(name: str, **kwargs) -> argparse.ArgumentParser:
    """For other parts: add ``facetron export <name>`` after :func:`add_parser` ran."""
    if not EXPORT_SUBPARSERS:
        raise RuntimeError("facetron.cli.export.add_parser has not been called")
    return EXPORT_SUBPARSERS[-1].add_parser(name, **kwargs)


def _split(text: str | None) -> list[str] | None:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def _merged(args: argparse.Namespace):
    """(base, plan): the base model with the LoRAs of ``args`` (if any) fused in place."""
    from facetron.diffusion.base_model import load_base_model
    from facetron.export.merge import fuse_into, lora_plan

    plan = lora_plan(args.face_lora, args.style_lora, args.w_face, args.w_style) if args.face_lora else []
    base = load_base_model(args.base_model)
    if plan:
        fuse_into({"unet": base.unet, "text_encoder": base.text_encoder}, plan)  # in place: one copy in memory
    return base, plan


def run_merge(args: argparse.Namespace) -> int:
    from facetron.export.merge import ensure_writable_dir, merge_provenance, save_merged

    ensure_writable_dir(args.out)
    base, plan = _merged(args)
    out = save_merged(base, base.unet, base.text_encoder, args.out, provenance=merge_provenance(base, plan))
    print(f"[export merge] merged model written to {out}")
    if base.is_smoke_model:
        print("[export merge] note: tiny smoke-test model with random weights: its pictures are not portraits")
    return 0


def run_onnx(args: argparse.Namespace) -> int:
    from facetron.export.merge import ensure_writable_dir, merge_provenance
    from facetron.export.onnx_export import export_onnx

    ensure_writable_dir(args.out)
    models = _split(args.models) or []
    if args.runtime_lora_rank and args.face_lora:
        # the runtime-LoRA graph must come from the base UNet: export it before merging
        from facetron.diffusion.base_model import load_base_model

        base = load_base_model(args.base_model)
        export_onnx(base, args.out, models=[], fp16=args.fp16, opset=args.opset,
                    runtime_lora_rank=args.runtime_lora_rank)
        args.runtime_lora_rank = 0
        del base
    base, plan = _merged(args)
    provenance = merge_provenance(base, plan)
    if plan:  # the recorded base is the unmerged folder: validation redoes the merge from the LoRA files
        provenance["merged_in_memory"] = True
    manifest = export_onnx(base, args.out, models=models, fp16=args.fp16, opset=args.opset,
                           runtime_lora_rank=args.runtime_lora_rank or None, provenance=provenance)
    for name, entry in manifest["models"].items():
        print(f"[export onnx] {name}: {Path(args.out) / entry['path']}")
    return 0


def run_validate(args: argparse.Namespace) -> int:
    from facetron.export.validate import load_sources, summary_lines, validate_export

    base, unet, te = load_sources(args.onnx_dir, args.base_model)
    report = validate_export(args.onnx_dir, base_model=base, unet=unet, text_encoder=te, models=_split(args.models),
                             batch=args.batch, seed=args.seed, report_path=args.report)
    for line in summary_lines(report):
        print(line)
    print(f"[export validate] {'PASS' if report['pass'] else 'FAIL'}; report: "
          f"{args.report or Path(args.onnx_dir) / 'validation.json'}")
    return 0 if report["pass"] else 1


def run_trt(args: argparse.Namespace) -> int:
    from facetron.export.trt import build_engines, tensorrt_unavailable_reason, trtexec_commands

    out = args.out or args.onnx_dir
    if args.print_commands:
        for line in trtexec_commands(args.onnx_dir, out, models=_split(args.models)):
            print(line)
        return 0
    reason = tensorrt_unavailable_reason()
    if reason:
        print(f"[export trt] {reason}; on a GPU host run:")
        for line in trtexec_commands(args.onnx_dir, out, models=_split(args.models)):
            print(line)
        return 3
    for name, path in build_engines(args.onnx_dir, out, models=_split(args.models)).items():
        print(f"[export trt] {name}: {path}")
    return 0
