"""``facetron bench``: latency benchmarks (results in benchmarks/results/).

* ``all``   — the suite (pairs + load sweeps + stage breakdown), ``--full`` adds SD-1.5 shapes
* ``pairs`` — only the side-by-side pairs
* ``lora``  — the runtime-LoRA vs merged UNet pair alone (tiny, under a minute)
* ``load``  — only the load sweeps (own server, or ``--url`` of a running one)
* ``soak``  — many clients for a minute: unexpected errors and server memory growth
* ``faces`` — the face-path benchmark (embedder vs dlib-bin, pipeline, Triton vs in-process)
* ``runtimes`` — per diffusion net: torch eager vs ONNX Runtime vs OpenVINO fp32 / int8 weights (``--full``: SD-1.5)
* ``onboarding`` — one user from photos to a first portrait, seconds and peak RSS per stage (``--full``: SD-1.5)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from facetron.cli.options import add_runtime_precision
from facetron.errors import InvalidInputError


def _faces(args: argparse.Namespace) -> int:
    from facetron.benchmarks.faces import run

    result = run(repeats=args.repeats)
    print(json.dumps({k: result[k] for k in ("embedder", "pipeline", "triton", "written")}, indent=2))
    return 0


def _print_summary(result: dict) -> int:
    from facetron.benchmarks.suite import headline

    suite = result.get("suite", {})
    print(f"\nwall time: {result['wall_s']} s (load average {suite.get('loadavg_start')} -> {suite.get('loadavg_end')})")
    for label, ratio, detail in headline(result):
        print(f"  {label:<52} {ratio!s:>7}  {detail}")
    for case, rows in (result.get("load") or {}).items():
        for r in rows:
            print(f"  load {case:<28} c={r['concurrency']:<3} p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  "
                  f"{r['throughput_rps']} req/s  errors {r['errors']}/{r['requests']}")
    portrait = result.get("portrait")
    if portrait:
        print(f"  portrait: {portrait['status']}" + (f" ({portrait['reason']})" if portrait.get("reason") else ""))
    for f in result.get("files", []):
        print(f"  wrote {f}")
    errors = result.get("errors") or {}
    for key, msg in errors.items():
        print(f"  FAILED {key}: {msg}")
    return 1 if errors else 0


def _suite(parts: tuple[str, ...], name: str):
    def run(args: argparse.Namespace) -> int:
        from facetron.benchmarks.suite import run_suite

        result = run_suite(full=getattr(args, "full", False), quick=args.quick, parts=parts, name=name,
                           out_dir=args.out)
        return _print_summary(result)

    return run


def _concurrency(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise InvalidInputError("--concurrency", f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise InvalidInputError("--concurrency", f"every level must be >= 1, got {text!r}")
    return values


def _load(args: argparse.Namespace) -> int:
    from facetron.benchmarks.load import preset
    from facetron.benchmarks.suite import Settings, loadavg, run_sweeps, run_suite, write_report

    if args.url is None:
        if args.model or args.concurrency or args.per_worker:
            raise InvalidInputError("--model/--concurrency/--per-worker", "need --url (the suite's own server "
                                    "runs the default cases: omit them, or start a server and pass --url)")
        return _print_summary(run_suite(quick=args.quick, parts=("load",), name="load", out_dir=args.out))
    settings = Settings.for_mode(args.quick)
    if args.per_worker:
        settings.per_worker = {m: args.per_worker for m in (args.model or ["tokenizer"])}
    conc = _concurrency(args.concurrency) if args.concurrency else settings.concurrency
    cases = [preset(m) for m in (args.model or ["tokenizer", "face_detector", "face_select"])]
    t0 = time.perf_counter()
    result: dict = {"suite": {"mode": "load", "url": args.url, "parts": ["load"], "loadavg_start": loadavg()},
                    "pairs": {}}
    run_sweeps(args.url, cases, settings, result, concurrency=conc)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    result["suite"]["loadavg_end"] = loadavg()
    result["files"] = [str(p) for p in write_report(result, "load", args.out)]
    return _print_summary(result)


def _soak(args: argparse.Namespace) -> int:
    from facetron.benchmarks.soak import run_soak

    result, path = run_soak(clients=args.clients, seconds=args.seconds, warmup_s=args.warmup)
    print(json.dumps({k: result[k] for k in ("calls", "errors", "unexpected_errors", "rss_growth_after_warmup")},
                     indent=2))
    print(f"wrote {path} (+ .md, .png)")
    return 1 if result["unexpected_errors"] else 0


def _runtimes(args: argparse.Namespace) -> int:
    from facetron.benchmarks.runtimes import run

    nets = [n.strip() for n in args.nets.split(",") if n.strip()] if args.nets else None
    result = run(full=args.full, repeats=args.repeats, nets=nets, out_dir=args.out, int8=args.int8)
    print(f"CPU: {result['cpu']['model']} ({', '.join(result['cpu']['kernel_flags'])})")
    for name, r in result["nets"].items():
        for variant, e in r["variants"].items():
            print(f"  {name:<13} {variant:<28} " + (f"ERROR {e['error']}" if "error" in e else
                  f"{e.get('ms', float('nan')):>10.3f} ms  x torch {e.get('over_torch', 1.0)!s:<6} "
                  f"max abs {e.get('max_abs', 0):.3g}  rel L2 {e.get('rel_l2', 0):.3g}"))
    for f in result.get("files", []):
        print(f"  wrote {f}")
    return 0


def _served(args: argparse.Namespace) -> int:
    from facetron.benchmarks.served_portrait import run

    result = run(full=args.full, out_dir=args.out, fewstep=args.fewstep)
    print(f"  chosen: {result['runtime_choice']['runtimes']} {result['runtime_choice']['precisions']}")
    for f in result["files"]:
        print(f"  wrote {f}")
    return 0


def _portrait(args: argparse.Namespace) -> int:
    from facetron.benchmarks.portrait_e2e import VARIANTS, psnr_text, run

    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else VARIANTS
    result = run(full=args.full, variants=variants, threads=args.threads, out_dir=args.out)
    print(f"CPU: {result['cpu']['model']} ({', '.join(result['cpu']['kernel_flags'])}); {result['note']}")
    dev = {d["variant"]: f"  PSNR vs {d['vs']} {psnr_text(d['psnr_db'])}" for d in result["deviations"]}
    for variant, e in result["variants"].items():
        s = e.get("stages")
        print(f"  {variant:<36} " + (f"ERROR {e['error']}" if s is None else
              f"{s['total_s']:>9.2f} s  ({e['steps']} steps, UNet {s['unet_s_per_step']:.3f} s/step)  "
              f"x facechain {e['speedup_over_facechain']}{dev.get(variant, '')}"))
    control = result.get("controlnet_step")
    if control:
        print("  controlnet_step " + (f"ERROR {control['error']}" if "error" in control else
              f"plain {control['plain_s']} s, controlnet + unet {control['controlled_step_s']} s per step "
              f"(x{control['controlled_over_plain']})"))
    for f in result.get("files", []):
        print(f"  wrote {f}")
    return 1 if any("error" in e for e in [*result["variants"].values(), control or {}]) else 0


def _lora(args: argparse.Namespace) -> int:
    from facetron.benchmarks.pairs import write_runtime_lora

    r = write_runtime_lora(users=args.users, repeats=args.repeats, out_dir=args.out, full=args.full)
    for k, v in r.items():
        if "_over_" in k:
            print(f"  {k:<48} {v}")
    for f in r["files"]:
        print(f"  wrote {f}")
    return 1 if r["errors"] else 0


def _training(args: argparse.Namespace) -> int:
    from facetron.benchmarks.training import run

    print(json.dumps(run(full=args.full), indent=2))
    return 0


def _onboarding(args: argparse.Namespace) -> int:
    from facetron.benchmarks.onboarding import run

    if args.train_steps is not None and args.train_steps < (2 if args.full else 1):
        raise InvalidInputError("--train-steps", f"must be >= {2 if args.full else 1}"
                                + (" with --full (the first step and one to extrapolate from)" if args.full else "")
                                + f", got {args.train_steps}")
    if args.portrait_steps is not None and args.portrait_steps < 1:
        raise InvalidInputError("--portrait-steps", f"must be >= 1, got {args.portrait_steps}")
    cpu_runtime = args.cpu_runtime or "auto"
    precision = args.precision or ("auto" if cpu_runtime == "auto" else "f32")  # as `export repository`
    result = run(full=args.full, merged=args.merged, train_steps=args.train_steps, portrait_steps=args.portrait_steps,
                 cpu_runtime=cpu_runtime, precision=precision, out_dir=args.out, work_dir=args.work_dir)
    print(f"CPU: {result['cpu']['model']} ({', '.join(result['cpu']['kernel_flags'])})")
    for stage, s in result["stages"].items():
        print(f"  {stage:<15} {s['seconds']:>9.1f} s  peak RSS {s['peak_rss_gib']:.2f} GiB"
              + ("  (extrapolated)" if s["extrapolated"] else ""))
    print(f"  onboarding      {result['onboarding_s']:>9.1f} s  (wall {result['wall_s']} s)")
    for line in result["faster_next"]:
        print(f"  next: {line}")
    for f in result["files"]:
        print(f"  wrote {f}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="latency benchmarks (JSON + Markdown + PNG in benchmarks/results/)")
    bsub = p.add_subparsers(dest="bench_command", required=True, metavar="SUITE")
    f = bsub.add_parser("faces", help="embedder vs dlib-bin, face pipeline throughput, Triton vs in-process")
    f.add_argument("--repeats", type=int, default=20, help="timed calls per measurement")
    f.set_defaults(func=_faces)
    s = bsub.add_parser("soak", help="C clients x S seconds of mixed portrait/face_select/face_detector calls "
                                     "(some cancelled): unexpected errors and server RSS growth")
    s.add_argument("--clients", type=int, default=16, help="concurrent clients")
    s.add_argument("--seconds", type=float, default=60.0, help="how long the clients call")
    s.add_argument("--warmup", type=float, default=10.0, help="seconds before the RSS baseline")
    s.set_defaults(func=_soak)
    rt = bsub.add_parser("runtimes", help="per diffusion net: torch eager, ONNX Runtime, OpenVINO fp32 (dynamic, "
                                          "static) and int8 weights: ms/call and deviation from torch (tiny; "
                                          "--full: SD-1.5 shapes, minutes and ~15 GB)")
    rt.add_argument("--full", action="store_true", help="SD-1.5 shapes (random weights); run it alone on the machine")
    rt.add_argument("--int8", action="store_true", help="with --full: also calibrated int8 (weights + activations, "
                                                         "nncf.quantize on real trajectories; +25-35 min)")
    rt.add_argument("--repeats", type=int, default=None, help="interleaved calls per variant (default 20; 3 with --full)")
    rt.add_argument("--nets", default=None, help="comma-separated subset of text_encoder,unet,unet_lora,vae_decoder,"
                                                 "vae_encoder")
    rt.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/)")
    rt.set_defaults(func=_runtimes)
    po = bsub.add_parser("portrait", help="one portrait end to end: FaceChain's recipe (diffusers, torch eager, 40 "
                                          "DPM-Solver steps) vs facetron's served nets and loop per runtime "
                                          "(ORT f32, OpenVINO f32 / bf16 / int8 weights): seconds per stage, "
                                          "speed-ups, numerical deviation (tiny; --full: SD-1.5 shapes)")
    po.add_argument("--full", action="store_true", help="SD-1.5 shapes, 512x512, random weights: needs ~15 GB and the "
                                                        "machine alone, ~20 minutes on 2 cores")
    po.add_argument("--variants", default=None, help="comma-separated subset of facechain, diffusers_torch_bf16, "
                                                     "facetron_<runtime>_<precision>[_cacheN] (25 steps), "
                                                     "facetron_<runtime>_<precision>_fewstep[_vae] (4 LCM steps, "
                                                     "tiny autoencoder / full VAE), controlnet_step (the "
                                                     "ControlNet's cost per step); default: all")
    po.add_argument("--threads", type=int, default=2, help="threads per runtime and for torch (default 2, as served)")
    po.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/)")
    po.set_defaults(func=_portrait)
    sv = bsub.add_parser("served", help="one portrait served end to end: repository assembled with the CLI defaults "
                                         "(auto runtimes/precisions), tritonserver, gRPC portrait with and without "
                                         "step caching (tiny; --full SD-1.5 shapes: ~10 min, ~22 GB, run it alone)")
    sv.add_argument("--full", action="store_true", help="SD-1.5 shapes (random weights; ~10 min, ~22 GB)")
    sv.add_argument("--fewstep", action="store_true",
                    help="the few-step path served: a random distillation LoRA (unet_fewstep) and a random TAESD "
                         "beside the full VAE; LCM 4 steps at guidance 1 with each VAE, and the default call")
    sv.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/)")
    sv.set_defaults(func=_served)
    lo = bsub.add_parser("lora", help="runtime-LoRA UNet vs merged UNets alone (ORT; 1 user also in the served "
                                      "OpenVINO runtime), tiny model, under a minute")
    lo.add_argument("--users", type=int, default=8, help="users (LoRAs) served by the runtime-LoRA UNet")
    lo.add_argument("--full", action="store_true", help="also 1 user at SD-1.5 shapes, ORT fp32 and OpenVINO bf16 as "
                                                         "served (random weights; ~10 minutes, ~12 GB: run it alone)")
    lo.add_argument("--repeats", type=int, default=30, help="interleaved calls per variant")
    lo.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/)")
    lo.set_defaults(func=_lora)
    t = bsub.add_parser("training", help="LoRA training steps/s (tiny; --full adds SD-1.5 shapes, minutes)")
    t.add_argument("--full", action="store_true", help="also SD-1.5 shapes (minutes)")
    t.set_defaults(func=_training)
    ob = bsub.add_parser("onboarding", help="one user from photos to a first portrait: prepare, train, export "
                                            "repository (+ add-user), serve + one gRPC portrait; seconds and peak "
                                            "RSS per stage (tiny: minutes; --full: SD-1.5 shapes, training "
                                            "extrapolated; ~22 min on 2 AVX2 cores, run it alone)")
    ob.add_argument("--full", action="store_true", help="SD-1.5 shapes (random weights): trains --train-steps steps "
                                                        "and extrapolates to FaceChain's min(200 x photos, 800)")
    ob.add_argument("--merged", action="store_true", help="merged identity mode: export add-user too, served with "
                                                          "explicit model control")
    ob.add_argument("--train-steps", type=int, default=None,
                    help="LoRA training steps run (default: 300, as `facetron demo`; with --full 4: the first + 3 "
                         "timed, the rest of FaceChain's default extrapolated)")
    ob.add_argument("--portrait-steps", type=int, default=None,
                    help="denoising steps of the first portrait (default: the server's default)")
    add_runtime_precision(ob, "runtime of the nets, as `export repository --cpu-runtime` (default auto)",
                          "precision of the nets, as `export repository --precision` (default: auto with "
                          "--cpu-runtime auto, else f32)", default=None)
    ob.add_argument("--work-dir", type=Path, default=None,
                    help="where the temporary work folder goes (default: the system's temp folder)")
    ob.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/)")
    ob.set_defaults(func=_onboarding)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--quick", action="store_true", help="fewer repeats and concurrency levels (~1-2 min)")
        q.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/)")

    a = bsub.add_parser("all", help="the suite: pairs + load sweeps + stage breakdown (default ~3-5 min)")
    a.add_argument("--full", action="store_true", help="also SD-1.5 shapes (random weights), several minutes more")
    common(a)
    a.set_defaults(func=_suite(("pairs", "load"), "all"))
    pr = bsub.add_parser("pairs", help="side-by-side pairs only (ORT vs torch, runtime LoRA vs merged, Triton vs "
                                       "in-process, embedder vs dlib-bin)")
    pr.add_argument("--full", action="store_true", help="also ORT vs torch with SD-1.5 shapes")
    common(pr)
    pr.set_defaults(func=_suite(("pairs",), "pairs"))
    ld = bsub.add_parser("load", help="concurrency sweeps over gRPC + stage breakdown")
    ld.add_argument("--url", default=None, help="HOST:PORT of a running Triton (default: start one on 127.0.0.1)")
    ld.add_argument("--model", action="append", help="with --url: model to load-test (repeatable; presets: "
                                                     "tokenizer, face_detector, face_embedder, face_select, portrait)")
    ld.add_argument("--concurrency", default=None, help="with --url: levels, e.g. 1,2,4,8,16")
    ld.add_argument("--per-worker", type=int, default=None, help="with --url: requests per concurrent worker")
    common(ld)
    ld.set_defaults(func=_load)
