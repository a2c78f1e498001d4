"""Onboarding end to end: how long a new user waits from photos to a first
portrait, stage by stage, with each stage's peak memory.

The stages run what the operator's commands run, each in a fresh child
process as each command is one (its imports and model loading count):

1. ``prepare``: ``facetron train prepare`` on the shipped demo photos (detect,
   filter, align, caption; the user registered, a token issued);
2. ``train``: ``facetron train lora`` — the tiny default model for as many
   steps as ``facetron demo`` trains; with ``full`` SD-1.5 shapes (random
   weights) for a measured fraction (the first step + a few more),
   **extrapolated** to FaceChain's default ``min(200 x photos, 800)`` steps:
   ``measured_s + (planned_steps - trained_steps) x median_steady_step_s``;
3. ``make_servable``: ``facetron export repository`` (cpu target, the given
   ``--cpu-runtime``/``--precision``, default auto) and, in merged mode,
   ``facetron export add-user``;
4. ``first_portrait``: a real tritonserver started by the project's launcher,
   then one gRPC ``portrait`` call (1 image) with the user's token; the
   server is stopped after (not counted).

Peak memory: the RSS of this process and all its children (the stage's
worker, tritonserver and its python-backend stubs) summed, sampled every
0.2 s by :class:`facetron.rss_monitor.RssMonitor` (a lower bound of the true
peak; shared pages count once per process).

Run: ``facetron bench onboarding [--full] [--merged]`` -> benchmarks/results/
``<date>-<machine>-onboarding-<spec>.{json,md,png}``. ``full`` needs the machine
alone (22 minutes on the 2-core AVX2 EPYC with a fresh runtime choice, peak 13.4 GiB
sampled at the first portrait, 9.0 GiB at the repository's assembly).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from facetron.rss_monitor import RssMonitor

USER = "onboarding"
#: steps trained on the tiny model: what ``facetron demo`` trains by default (its ``--train-steps``)
TINY_TRAIN_STEPS = 300
#: steps trained at SD-1.5 shapes: the first (latent caching, optimizer warm-up) + 3 steady ones, extrapolated
FULL_TRAIN_STEPS = 4
#: the demo's caption attribute
ATTRS = ("gender=woman",)
STAGES = ("prepare", "train", "make_servable", "first_portrait")
#: sub-stages in the order they run (the PNG's segments)
PARTS = ("prepare", "train", "export_repository", "add_user", "server_start", "portrait_call")
PART_COLORS = {"prepare": "#7a5", "train": "#c44", "export_repository": "#36c", "add_user": "#69d",
               "server_start": "#e94", "portrait_call": "#a6c"}
#: seconds between RSS samples
RSS_INTERVAL_S = 0.2
#: load average above the core count that the run's own processes account for (a warning beyond it)
LOAD_SLACK = 0.5


def facechain_steps(photos: int) -> int:
    """FaceChain's default training length for ``photos`` kept photos (the trainer's own rule)."""
    from facetron.training.lora_config import LoraTrainConfig

    return LoraTrainConfig().resolve_steps(photos)


def extrapolate_train(measured_s: float, step_s: list[float], planned_steps: int) -> dict:
    """The training time of ``planned_steps`` from a run of ``len(step_s)`` steps whose stage took ``measured_s``
    (process start, model loading, first step, the rest, saving): each step not run costs the median steady step
    (the steps after the first; the first caches latents and warms the optimizer up)."""
    trained = len(step_s)
    missing = max(0, planned_steps - trained)
    if missing and trained < 2:
        raise ValueError(f"extrapolation needs the first step and at least one more, got {trained} step(s)")
    steady = statistics.median(step_s[1:]) if trained >= 2 else None
    estimate = measured_s + missing * (steady or 0.0)
    row = {
        "extrapolated": missing > 0,
        "trained_steps": trained,
        "planned_steps": planned_steps,
        "measured_s": round(measured_s, 2),
        "first_step_s": round(step_s[0], 3) if step_s else None,
        "median_steady_step_s": round(steady, 4) if steady is not None else None,
        "seconds": round(estimate, 1),
    }
    if missing:
        row["formula"] = ("train_s = measured_s + (planned_steps - trained_steps) x median_steady_step_s = "
                          f"{measured_s:.1f} + ({planned_steps} - {trained}) x {steady:.3f} = {estimate:.1f}")
    return row


# --- the stages' work, each in a fresh child process (as each is one CLI command) ------------------------------


def _child(fn, *args):
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _prepare(photos: Path, out: Path, users_dir: Path, resolution: int) -> dict:
    """What ``facetron train prepare PHOTOS --user U --attr gender=woman`` runs."""
    from facetron.faces.attributes import UserAttributes, parse_attr_flags
    from facetron.training.preprocess import PrepareConfig, prepare_photos, register_user
    from facetron.users import UserRegistry

    result = prepare_photos(photos, out, PrepareConfig(resolution=resolution),
                            UserAttributes(parse_attr_flags(list(ATTRS))), progress=False)
    register_user(UserRegistry(users_dir), USER, result)
    return {"photos": len(result.photos), "kept": len(result.kept), "dataset": str(result.dataset_dir)}


def _train(dataset: Path, out: Path, users_dir: Path, base: Path | None, steps: int) -> dict:
    """What ``facetron train lora DATASET --user U --train-steps N`` runs (LoRA registered), every step timed."""
    from facetron.training.lora_config import LoraTrainConfig
    from facetron.training.train_lora import train_lora
    from facetron.users import UserRegistry

    from facetron.benchmarks.timing import StepTimer

    on_step = StepTimer()

    t0 = on_step.start()
    result = train_lora(dataset, out, user_id=USER, base_model=base, config=LoraTrainConfig(steps=steps),
                        progress=False, callback=on_step)
    UserRegistry(users_dir).install_lora(USER, result.lora_path, result.metadata_path)
    return {"seconds": time.perf_counter() - t0, "step_s": on_step.times, "steps": result.steps,
            "precision": result.precision.name, "precision_why": result.precision.why}


def _export_repository(repo: Path, base: Path | None, users_dir: Path, identity_mode: str, cpu_runtime: str,
                       precision: str, log: Path) -> dict:
    """What ``facetron export repository --out R [--base-model B] --users-dir U`` runs (printed output to ``log``)."""
    import json

    from facetron.export.diffusion_source import DiffusionSource
    from facetron.export.repository import RUNTIME_CHOICE_FILE, assemble_repository

    with open(log, "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        assemble_repository("cpu", repo, diffusion=DiffusionSource(base_model=base), users_dir=users_dir,
                            identity_mode=identity_mode, cpu_runtime=cpu_runtime, precision=precision)
    choice = repo / RUNTIME_CHOICE_FILE
    if not choice.is_file():
        return {}
    recorded = json.loads(choice.read_text())
    row = {"runtimes": recorded.get("runtimes"), "precisions": recorded.get("precisions"),
           "choice_mode": recorded.get("mode"), "export_stage_s": recorded.get("stage_s")}
    if recorded.get("choice_cache") is not None:  # auto: the nets whose measured choice was kept from before
        row["choice_reused"] = sorted(recorded["choice_cache"].get("reused") or {})
    return row


def _add_user(repo: Path, users_dir: Path, base: Path | None) -> str:
    """What ``facetron export add-user --repo R --user U`` runs (merged mode)."""
    from facetron.export.repository import add_merged_user

    return str(add_merged_user(repo, USER, users_dir, base))


# --- the benchmark ---------------------------------------------------------------------------------------------


class _Stages:
    """Times a part (``wall_s``, and ``seconds`` unless extrapolated later), records its sampled peak RSS,
    prints one line when it starts and one when it ends."""

    def __init__(self, rss: RssMonitor) -> None:
        self.rss = rss
        self.parts: dict[str, dict] = {}

    @contextlib.contextmanager
    def part(self, name: str):
        print(f"[bench onboarding] {name} ...", flush=True)
        row: dict = {}
        t0 = time.perf_counter()
        with self.rss.stage(name):
            yield row
        row["wall_s"] = row["seconds"] = round(time.perf_counter() - t0, 2)
        row["peak_rss_gib"] = self.rss.peaks_gib()[name]
        self.parts[name] = row
        print(f"[bench onboarding] {name}: {row['seconds']:.1f} s, peak RSS {row['peak_rss_gib']:.2f} GiB",
              flush=True)


def run(full: bool = False, merged: bool = False, train_steps: int | None = None,
        portrait_steps: int | None = None, cpu_runtime: str = "auto", precision: str = "auto",
        out_dir: Path | None = None, work_dir: Path | None = None) -> dict:
    """The benchmark (numbered steps below); returns the result written to ``out_dir``."""
    from facetron.benchmarks.runtimes import _loadavg
    from facetron.client import FacetronClient
    from facetron.contract import IDENTITY_MODES
    from facetron.cpu_info import cpu_description
    from facetron.diffusion.base_model import ensure_tiny_model, write_base_model
    from facetron.diffusion.model_spec import SD15, TINY
    from facetron.training.demo_photos import make_demo_photos
    from facetron.triton.server import TritonServer, base_models
    from facetron.users import UserRegistry

    steps = train_steps or (FULL_TRAIN_STEPS if full else TINY_TRAIN_STEPS)
    if full and steps < 2:
        raise ValueError(f"train_steps: the extrapolation needs the first step and one more, got {steps}")
    spec = SD15 if full else TINY
    identity_mode = IDENTITY_MODES[1] if merged else IDENTITY_MODES[0]
    cpu = cpu_description()
    result: dict = {
        "spec": ("sd15" if full else "tiny") + ("-merged" if merged else ""),
        "model": spec.name, "resolution": spec.resolution, "identity_mode": identity_mode,
        "cpu": {"model": cpu["model"], "kernel_flags": cpu["kernel_flags"], "flags": cpu["flags"]},
        "settings": {"cpu_runtime": cpu_runtime, "precision": precision, "train_steps": steps,
                     "portrait_steps": portrait_steps or "server default", "num_images": 1},
        "loadavg_start": _loadavg(), "cores": os.cpu_count(),
        "note": ("random weights (SD-1.5 shapes): speed and memory only; no face is generated" if full else
                 "tiny default model (random weights): speed and memory of the pipeline, not of SD-1.5"),
    }
    t_all = time.perf_counter()
    with (tempfile.TemporaryDirectory(dir=work_dir, prefix="facetron-bench-onboarding-") as tmp,
          RssMonitor(RSS_INTERVAL_S) as rss):
        work = Path(tmp)
        registry = UserRegistry(work / "users")
        # 0. set-up, not onboarding: the base model folder and the demo photos
        t0 = time.perf_counter()
        base = write_base_model(spec, work / "base") if full else None
        if not full:
            ensure_tiny_model()
        photos = make_demo_photos(work / "photos")
        result["setup_s"] = round(time.perf_counter() - t0, 1)
        stages = _Stages(rss)
        # 1. prepare
        with stages.part("prepare") as row:
            row.update(_child(_prepare, photos, work / "prepared", registry.root, spec.resolution))
            token = registry.issue_token(USER)
        # 2. train (full: a measured fraction, extrapolated to FaceChain's default)
        with stages.part("train") as row:
            trained = _child(_train, Path(stages.parts["prepare"]["dataset"]), work / "loras", registry.root, base,
                             steps)
            row.update({k: trained[k] for k in ("precision", "precision_why")})
        planned = facechain_steps(stages.parts["prepare"]["kept"]) if full else steps
        row.update(extrapolate_train(row["wall_s"], trained["step_s"], planned))
        if row["extrapolated"]:
            print(f"[bench onboarding] train: extrapolated to {planned} steps: {row['formula']} s", flush=True)
        # 3. make the user servable
        repo = work / "repo"
        with stages.part("export_repository") as row:
            row.update(_child(_export_repository, repo, base, registry.root, identity_mode, cpu_runtime, precision,
                              work / "export_repository.log"))
        if merged:
            with stages.part("add_user") as row:
                row["path"] = Path(_child(_add_user, repo, registry.root, base)).name
        # 4. serve + the first portrait over gRPC
        server = TritonServer(repo, log_path=work / "tritonserver.log", env={"FACETRON_USERS_DIR": str(registry.root)},
                              model_control_mode="explicit" if merged else "none",
                              load_models=base_models(repo) if merged else ())
        try:
            with stages.part("server_start"):
                server.start()
            with stages.part("portrait_call") as row, FacetronClient(server.grpc_url, timeout_s=7200) as client:
                answer = client.portrait(USER, token=token, num_images=1, seed=1, steps=portrait_steps)
                row["images_returned"] = int(len(answer.images))
                row["server_timings_ms"] = answer.report.get("timings_ms")
        finally:
            t0 = time.perf_counter()
            server.stop()
            result["server_stop_s"] = round(time.perf_counter() - t0, 1)
    result["wall_s"] = round(time.perf_counter() - t_all, 1)
    result["loadavg_end"] = _loadavg()
    result["parts"] = stages.parts
    result["stages"] = summarize(stages.parts)
    result["onboarding_s"] = round(sum(s["seconds"] for s in result["stages"].values()), 1)
    result["faster_next"] = faster_next(result)
    return write(result, out_dir)


def summarize(parts: dict[str, dict]) -> dict[str, dict]:
    """The four stages from their parts: seconds summed, the largest peak RSS."""
    groups = {"prepare": ("prepare",), "train": ("train",), "make_servable": ("export_repository", "add_user"),
              "first_portrait": ("server_start", "portrait_call")}
    out = {}
    for stage, names in groups.items():
        rows = [parts[n] for n in names if n in parts]
        if rows:
            out[stage] = {"seconds": round(sum(r["seconds"] for r in rows), 1),
                          "peak_rss_gib": max(r["peak_rss_gib"] for r in rows),
                          "parts": [n for n in names if n in parts],
                          "extrapolated": any(r.get("extrapolated") for r in rows)}
    return out


def faster_next(result: dict) -> list[str]:
    """What would make onboarding faster next, biggest part first, from the numbers."""
    parts, total = result["parts"], result["onboarding_s"] or 1.0
    flags = result["cpu"]["kernel_flags"]
    lines = []
    for name, row in sorted(parts.items(), key=lambda kv: -kv[1]["seconds"]):
        share = f"{name} {row['seconds']:.0f} s ({100 * row['seconds'] / total:.0f}%)"
        if name == "train":
            bf16 = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
            per_step = row["median_steady_step_s"]
            lines.append(
                f"{share}: {row['planned_steps']} steps"
                + (f" x {per_step:.3f} s" if per_step is not None else "") + "; fewer steps "
                "(`--stop-on-plateau` ends when the loss stops falling), "
                + (f"training precision {row.get('precision')} on this CPU ({', '.join(bf16)})" if bf16 else
                   "a CPU with amx_bf16/avx512_bf16 (bf16 autocast; this one has neither)")
                + ", or a GPU")
        elif name == "export_repository":
            reused = row.get("choice_reused")
            choice = ("the runtime choice was measured here (kept for the next assembly on this kind of machine)"
                      if reused == [] else f"the runtime choice of {', '.join(reused)} was reused from the cache"
                      if reused else "`--cpu-runtime auto` measures each net here, a fixed runtime skips that")
            lines.append(f"{share}: once per deployment in runtime-LoRA mode (a new user needs only the LoRA "
                         f"installed); {choice}")
        elif name == "add_user":
            lines.append(f"{share}: merged mode fuses and exports a UNet per user; runtime-LoRA mode needs none")
        elif name == "server_start":
            lines.append(f"{share}: once per deployment (a running server serves a new user without a restart)")
        elif name == "portrait_call":
            lines.append(f"{share}: fewer denoising steps or step caching (`cache_interval`)")
        elif name == "prepare":
            lines.append(f"{share}: face detection and embedding of every photo")
    return lines


def markdown(result: dict) -> str:
    from facetron.benchmarks.report import markdown_table

    train = result["parts"]["train"]
    rows = [{"stage": stage, "parts": " + ".join(s["parts"]), "seconds": s["seconds"],
             "share %": round(100 * s["seconds"] / (result["onboarding_s"] or 1.0)),
             "peak RSS GiB": s["peak_rss_gib"], "extrapolated": "yes" if s["extrapolated"] else ""}
            for stage, s in result["stages"].items()]
    part_rows = [{"part": n, "seconds": r["seconds"], "peak RSS GiB": r["peak_rss_gib"]}
                 for n, r in result["parts"].items()]
    md = (f"Onboarding one user end to end, spec `{result['spec']}` ({result['model']}, {result['resolution']} px, "
          f"{result['identity_mode']} identity; {result['note']}): prepare the shipped demo photos, train the LoRA, "
          f"make the user servable, first portrait over gRPC (1 image, steps: "
          f"{result['settings']['portrait_steps']}). Each stage in a fresh process, as its CLI command; peak RSS: "
          "this process + all children (worker, tritonserver, python stubs).\n\n"
          f"CPU: {result['cpu']['model']}; kernel flags {', '.join(result['cpu']['kernel_flags']) or 'none'}\n\n"
          f"**Onboarding: {result['onboarding_s']} s** (measured wall {result['wall_s']} s incl. set-up "
          f"{result['setup_s']} s and server stop {result.get('server_stop_s')} s)\n\n"
          + _contention(result)
          + markdown_table(rows, ["stage", "parts", "seconds", "share %", "peak RSS GiB", "extrapolated"]) + "\n"
          + markdown_table(part_rows, ["part", "seconds", "peak RSS GiB"]) + "\n")
    if train["extrapolated"]:
        md += (f"Training **extrapolated**: {train['trained_steps']} steps measured ({train['wall_s']} s "
               f"wall), FaceChain's default is min(200 x photos, 800) = {train['planned_steps']} steps; "
               f"{train['formula']} s.\n\n")
    else:
        md += f"Training: all {train['trained_steps']} steps measured (precision {train.get('precision')}).\n\n"
    md += "What would make it faster next:\n\n" + "".join(f"- {line}\n" for line in result["faster_next"])
    md += f"\nload average {result['loadavg_start']} -> {result['loadavg_end']}\n"
    return md


def _contention(result: dict) -> str:
    """A warning line when other work competed for the cores: a 1-minute load average above the core count +
    :data:`LOAD_SLACK` (the stages themselves keep every core busy, the server's stubs a little more)."""
    loads = [x[0] for x in (result.get("loadavg_start"), result.get("loadavg_end")) if x]
    cores = result.get("cores")
    if not loads or not cores or max(loads) <= cores + LOAD_SLACK:
        return ""
    return (f"**Shared machine**: 1-minute load average up to {max(loads)} on {cores} cores during the run (other "
            "work competed for the CPU): the seconds are upper bounds of this machine's own.\n\n")


def write(result: dict, out_dir: Path | None = None) -> dict:
    from facetron.benchmarks.report import write_result

    path = write_result(f"onboarding-{result['spec']}", result, markdown(result), out_dir=out_dir)
    result["files"] = [str(path), str(path.with_suffix(".md")), str(plot(result, path.with_suffix(".png")))]
    return result


def plot(result: dict, path: Path) -> Path:
    """One stacked horizontal bar: seconds per part (train hatched where extrapolated)."""
    from facetron.benchmarks.machine import machine_info
    from facetron.benchmarks.plots import _plt, _save, footer_text

    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 2.8))
    left = 0.0
    for name in PARTS:
        row = result["parts"].get(name)
        if row is None:
            continue
        extrapolated = bool(row.get("extrapolated"))
        ax.barh([0], [row["seconds"]], left=left, color=PART_COLORS[name], hatch="//" if extrapolated else None,
                label=f"{name} {row['seconds']:.0f} s" + (" (extrapolated)" if extrapolated else ""))
        left += row["seconds"]
    ax.set_yticks([0], [result["spec"]])
    ax.set_xlabel("seconds")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.45))
    ax.set_title(f"onboarding one user ({result['spec']}): {result['onboarding_s']:.0f} s", fontsize=10)
    return _save(fig, path, footer_text(machine_info()))
