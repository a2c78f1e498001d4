"""The benchmark suite behind ``facetron bench all`` (and ``make bench``).

1. In-process pairs (no server running, so nothing else competes for the
   cores): ONNX Runtime vs torch eager per diffusion net, runtime-LoRA vs
   merged UNet for 1 and 8 users, embedder vs dlib-bin.
2. A Triton server of its own on 127.0.0.1: the repository is assembled into
   ``build/bench/`` (face stack + tokenizer, plus the diffusion and portrait
   models when they assemble), started in explicit model-control mode with
   the face stack, then every other model is loaded one by one — a model
   that fails to load is recorded with its error, the rest still run.
3. Triton vs in-process pairs, load sweeps (concurrency 1…16) with a stage
   breakdown from the statistics API for each, and — when ``portrait`` is
   ready — a portrait-call sweep and breakdown (else "not served yet").
4. ``<results>/<date>-<machine>-<name>.{json,md}`` + three PNGs.

A part that fails is recorded under ``errors`` (and the command exits 1);
the other parts still run and are written.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from facetron.benchmarks import pairs as P
from facetron.benchmarks.load import CONCURRENCY, LoadCase, preset, run_load, sweep
from facetron.benchmarks.machine import machine_info
from facetron.benchmarks.report import markdown_table, result_stem, write_result
from facetron.benchmarks.server_metrics import MetricsDelta
from facetron.benchmarks.triton_stats import STAGES, StatsDelta
from facetron.contract import ADMIN_KEY_ENV
from facetron.contract import EMBEDDING_DIM
from facetron.paths import REPO_ROOT

BUILD_DIR = REPO_ROOT / "build" / "bench"
BENCH_USER = "bench-user"
CORE_MODELS = ("tokenizer", "face_detector", "face_embedder", "face_select")
LOAD_ORDER = ("text_encoder", "vae_encoder", "vae_decoder", "unet", "portrait_generator", "portrait")
PARTS = ("pairs", "load")


@dataclass
class Settings:
    """Counts per mode: the default suite fits in a few minutes on 2 cores."""

    concurrency: tuple[int, ...] = CONCURRENCY
    per_worker: dict[str, int] = field(default_factory=lambda: {"tokenizer": 40, "face_detector": 6,
                                                                 "face_select": 3, "portrait": 2})
    portrait_concurrency: tuple[int, ...] = (1, 2, 4)
    portrait_steps: int = 4
    ort_repeats: int = 5
    sd15_repeats: int = 2
    lora_repeats: int = 24
    lora_users: int = 8
    triton_repeats: int = 10
    embedder_repeats: int = 5
    select_candidates: int = 2

    @classmethod
    def for_mode(cls, quick: bool = False) -> "Settings":
        if not quick:
            return cls()
        return cls(concurrency=(1, 4, 16), per_worker={"tokenizer": 10, "face_detector": 2, "face_select": 1,
                                                        "portrait": 1},
                   portrait_concurrency=(1, 2), ort_repeats=3, lora_repeats=4, triton_repeats=4, embedder_repeats=3)


# ----------------------------------------------------------------------------- server


def ensure_bench_user(users_dir: Path, user_id: str = BENCH_USER) -> None:
    """A synthetic user for portrait calls: random reference embedding + random LoRA on the tiny UNet."""
    import numpy as np

    from facetron.diffusion.base_model import load_base_model
    from facetron.training.random_lora import write_random_lora
    from facetron.users import UserRegistry

    registry = UserRegistry(users_dir)
    if not (registry.exists(user_id) and (registry.files(user_id) / "lora.safetensors").is_file()):
        emb = np.random.default_rng(7).standard_normal((1, EMBEDDING_DIM)).astype(np.float32)
        registry.save_reference_embedding(user_id, emb)
        lora = write_random_lora(users_dir / f".{user_id}-lora.safetensors", load_base_model().unet, rank=4,
                                 alpha=8.0, seed=7, std=0.05)
        registry.install_lora(user_id, lora)
        lora.unlink(missing_ok=True)
    grant_token(registry, user_id)


def grant_token(registry, user_id: str) -> str:
    """The benchmark acts as its user like an operator: the user's token in the operator's token store
    (issued when the store has none for a user with a token we cannot read back)."""
    from facetron.token_store import issue_kept

    return issue_kept(registry, user_id, reuse=True)[0]


@contextlib.contextmanager
def bench_server(build_dir: Path = BUILD_DIR, diffusion: bool = True) -> Iterator[tuple[object, dict]]:
    """Assemble a repository under ``build_dir``, serve it on 127.0.0.1, stop it afterwards.

    Yields ``(server, info)``; ``info`` says what was assembled, what loaded
    and the load error of each model that did not."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from facetron.export.diffusion_source import DiffusionSource
    from facetron.export.repository import assemble_repository
    from facetron.triton.server import TritonServer

    build_dir = Path(build_dir)
    users = build_dir / "users"
    users.mkdir(parents=True, exist_ok=True)
    repo = build_dir / "model_repository"
    info: dict = {"repository": str(repo), "assembled_with_diffusion": False, "load_errors": {}}
    if diffusion:
        try:
            assemble_repository("cpu", repo, diffusion=DiffusionSource(), users_dir=users)
            info["assembled_with_diffusion"] = True
            ensure_bench_user(users)
            info["bench_user"] = BENCH_USER
        except Exception as exc:  # the diffusion half is optional here: record why, serve the face stack
            info["diffusion_error"] = f"{type(exc).__name__}: {exc}"
    if not info["assembled_with_diffusion"]:
        assemble_repository("cpu", repo)
    present = sorted(p.name for p in repo.iterdir() if (p / "config.pbtxt").is_file())
    core = [m for m in CORE_MODELS if m in present]
    rest = [m for m in LOAD_ORDER if m in present] + [m for m in present if m not in CORE_MODELS + LOAD_ORDER]
    server = TritonServer(repo, model_control_mode="explicit", load_models=core, log_path=build_dir / "tritonserver.log",
                          env={"FACETRON_USERS_DIR": str(users)})
    server.start()
    os.environ.setdefault(ADMIN_KEY_ENV, server.admin_key)  # the harness's clients read statistics with it
    try:
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            for m in rest:
                try:
                    client.load_model(m, headers=server.admin_headers)
                except InferenceServerException as exc:
                    info["load_errors"][m] = (exc.message() or str(exc)).splitlines()[0][:400]
            info["served"] = [m for m in present if client.is_model_ready(m)]
        info["log"] = str(server.log_path)
        yield server, info
    finally:
        server.stop()


# ----------------------------------------------------------------------------- parts


def loadavg() -> list[float] | None:
    """1/5/15-min load averages: on shared cores they say how much others competed."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _guard(result: dict, key: str, fn: Callable[[], object]) -> object:
    """Run one part; on failure record the error (never swallow it silently)."""
    t0 = time.perf_counter()
    try:
        value = fn()
    except Exception as exc:
        result.setdefault("errors", {})[key] = f"{type(exc).__name__}: {exc}"
        print(f"[bench] {key}: FAILED: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}", flush=True)
        return None
    print(f"[bench] {key}: {time.perf_counter() - t0:.1f} s", flush=True)
    result.setdefault("part_seconds", {})[key] = round(time.perf_counter() - t0, 1)
    return value


def load_cases(settings: Settings) -> list[LoadCase]:
    return [preset("tokenizer"), preset("face_detector"), preset("face_select", candidates=settings.select_candidates)]


def run_sweeps(url: str, cases: list[LoadCase], settings: Settings, result: dict,
               concurrency: tuple[int, ...] | None = None, metrics_url: str | None = None) -> None:
    """Load sweep per case, each inside a statistics window (its stage breakdown)
    and, with ``metrics_url``, a scrape of Triton's /metrics before and after."""
    from facetron.client import FacetronClient

    with FacetronClient(url) as client:
        for case in cases:
            def one(case: LoadCase = case) -> None:
                run_load(url, case, 1, requests=1, warmup=0)  # cold start (sessions, caches) stays out of the stats
                scraped = MetricsDelta(metrics_url) if metrics_url else contextlib.nullcontext()
                with scraped, StatsDelta(client) as stats:
                    rows = sweep(url, case, concurrency or settings.concurrency,
                                 per_worker=settings.per_worker.get(case.model, 4))
                result.setdefault("load", {})[case.name] = rows
                result.setdefault("stages", {})[case.name] = stats.result
                if metrics_url:
                    result.setdefault("server_metrics", {})[case.name] = (
                        scraped.result if scraped.error is None else {"error": scraped.error})

            _guard(result, f"load:{case.name}", one)


def run_portrait(url: str, settings: Settings, result: dict, info: dict, metrics_url: str | None = None) -> None:
    """Portrait sweep + stage breakdown when ``portrait`` is ready, else say why not."""
    from facetron.client import FacetronClient

    with FacetronClient(url, timeout_s=300) as client:
        ready = client.model_ready("portrait")
        if not ready:
            reason = info.get("load_errors", {}).get("portrait") or info.get("diffusion_error") \
                or "no portrait model in the assembled repository"
            result["portrait"] = {"status": "not served yet", "reason": reason}
            return
        case = preset("portrait", steps=settings.portrait_steps, user_id=BENCH_USER)
        run_sweeps(url, [case], settings, result, concurrency=settings.portrait_concurrency, metrics_url=metrics_url)
        entry: dict = {"status": "served", "case": case.name, "stages": result.get("stages", {}).get(case.name)}
        try:
            out = client.infer(case.model, dict(case.inputs), ["report"])
            raw = out["report"].reshape(-1)[0]
            entry["report"] = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
        except Exception as exc:
            entry["report_error"] = f"{type(exc).__name__}: {exc}"
        result["portrait"] = entry


def run_suite(full: bool = False, quick: bool = False, parts: tuple[str, ...] = PARTS, name: str = "all",
              out_dir: Path | None = None, build_dir: Path = BUILD_DIR) -> dict:
    """Run the suite, write JSON + Markdown + PNGs; returns the result (with ``files``)."""
    t0 = time.perf_counter()
    s = Settings.for_mode(quick)
    mode = "full" if full else ("quick" if quick else "default")
    result: dict = {"suite": {"mode": mode, "parts": list(parts), "settings": asdict(s), "loadavg_start": loadavg()},
                    "pairs": {}}
    if "pairs" in parts:
        ort = result["pairs"].setdefault("ort_vs_torch", {})
        ort["tiny"] = _guard(result, "pairs:ort_vs_torch:tiny", lambda: P.ort_vs_torch("tiny", s.ort_repeats))
        if full:
            ort["sd15"] = _guard(result, "pairs:ort_vs_torch:sd15", lambda: P.ort_vs_torch("sd15", s.sd15_repeats))
        result["pairs"]["runtime_lora_vs_merged"] = _guard(
            result, "pairs:runtime_lora_vs_merged",
            lambda: P.runtime_lora_vs_merged(users=s.lora_users, repeats=s.lora_repeats))
        result["pairs"]["embedder_vs_dlib"] = _guard(result, "pairs:embedder_vs_dlib",
                                                     lambda: P.embedder_vs_dlib(s.embedder_repeats))

    def served() -> None:
        with bench_server(build_dir) as (server, info):
            result["server"] = info
            metrics_url = f"{server.host}:{server.metrics_port}"
            if "pairs" in parts:
                result["pairs"]["triton_vs_inprocess"] = _guard(
                    result, "pairs:triton_vs_inprocess",
                    lambda: P.triton_vs_inprocess(server.grpc_url, s.triton_repeats, s.select_candidates))
            if "load" in parts:
                run_sweeps(server.grpc_url, load_cases(s), s, result, metrics_url=metrics_url)
                _guard(result, "portrait", lambda: run_portrait(server.grpc_url, s, result, info, metrics_url))

    _guard(result, "server", served)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    result["suite"]["loadavg_end"] = loadavg()
    result["files"] = [str(p) for p in write_report(result, name, out_dir)]
    return result


# ----------------------------------------------------------------------------- report


def headline(result: dict) -> list[tuple[str, float | None, str]]:
    """(label, A/B time ratio, one-line value) for the figures people ask for first."""
    rows: list[tuple[str, float | None, str]] = []
    pairs = result.get("pairs") or {}
    for model, r in (pairs.get("triton_vs_inprocess") or {}).items():
        rows.append((f"{model}: Triton / in-process", r["triton_over_inprocess"],
                     f"{r['triton']['p50_ms']} vs {r['inprocess']['p50_ms']} ms p50 (overhead {r['overhead_ms']:+} ms)"))
    for spec, models in (pairs.get("ort_vs_torch") or {}).items():
        for model, r in (models or {}).items():
            rows.append((f"{spec} {model}: ORT / torch eager", r["ort_over_torch"],
                         f"{r['ort_ms']} vs {r['torch_ms']} ms p50 (batch {r['batch']})"))
    lora = pairs.get("runtime_lora_vs_merged")
    if lora:
        u, c = lora["users"], lora["calls_ms"]
        rows.append(("runtime-LoRA / merged, 1 user", lora["runtime_over_merged_1user"],
                     f"{c['runtime_1user']['p50_ms']} vs {c['merged_1user']['p50_ms']} ms (goal <= 1.05)"))
        if "runtime_1user_resident" in c:
            rows.append(("runtime-LoRA as served (inputs kept bound) / merged, 1 user (ORT)",
                         lora["runtime_resident_over_merged_1user"],
                         f"{c['runtime_1user_resident']['p50_ms']} vs {c['merged_1user']['p50_ms']} ms"))
        if "runtime_1user_openvino" in c:
            rows.append(("runtime-LoRA / merged, 1 user (OpenVINO static, as served)",
                         lora["runtime_openvino_over_merged_openvino_1user"],
                         f"{c['runtime_1user_openvino']['p50_ms']} vs {c['merged_1user_openvino']['p50_ms']} ms"))
        rows.append((f"runtime-LoRA / merged, {u} users (all resident)", lora[f"runtime_over_merged_{u}users_resident"],
                     f"{c[f'runtime_{u}users']['p50_ms']} vs {c[f'merged_{u}users_resident']['p50_ms']} ms"))
        rows.append((f"runtime-LoRA / merged, {u} users (reload per change)", lora[f"runtime_over_merged_{u}users_reload"],
                     f"{c[f'runtime_{u}users']['p50_ms']} vs {c[f'merged_{u}users_reload']['p50_ms']} ms "
                     f"(reload ≈ {lora['reload_ms_per_user_change']} ms per user change)"))
    emb = pairs.get("embedder_vs_dlib")
    if emb:
        pf = emb["per_face"]
        rows.append(("embedder ONNX b1 / dlib-bin (per face)", round(1 / emb["speedup_onnx_batch1_vs_dlib"], 3),
                     f"{pf['onnx_batch1']['p50_ms']} vs {pf['dlib_bin']['p50_ms']} ms "
                     f"({emb['verdicts_identical']}/{emb['verdict_pairs']} verdicts identical)"))
    return rows


def _fmt(v: object) -> str:
    return "–" if v is None else str(v)


def render_markdown(result: dict, machine: dict, figures: dict[str, str]) -> str:
    """Markdown tables of a suite result (the ``# name`` title is added by report.write_result)."""
    pk = machine.get("packages", {})
    suite = result["suite"]
    md = [f"facetron benchmark suite, mode **{suite['mode']}**, wall {result.get('wall_s')} s, load average "
          f"(1/5/15 min) {suite.get('loadavg_start')} at start, {suite.get('loadavg_end')} at end on "
          f"{machine.get('cores')} cores. "
          "Ratios are p50 times of pairs measured interleaved in one run; absolute ms drift between runs "
          "on shared cores. Diffusion nets are the tiny smoke model (random weights, not portraits) "
          "unless marked sd15 (SD-1.5 shapes, random weights).\n"]
    md.append("## Machine\n\n" + markdown_table(
        [{"key": k, "value": _fmt(machine.get(k))} for k in ("cpu", "gpu", "cores", "memory_gib", "python", "platform", "git")
         if k in machine] + [{"key": k, "value": _fmt(v)} for k, v in pk.items()], ["key", "value"]))
    md.append("## Headline\n\n" + markdown_table(
        [{"pair (A / B)": k, "ratio": _fmt(r), "detail": d} for k, r, d in headline(result)],
        ["pair (A / B)", "ratio", "detail"]))
    lora = (result.get("pairs") or {}).get("runtime_lora_vs_merged")
    if lora:
        md.append("## Runtime LoRA vs merged UNet (ONNX Runtime)\n\n" + lora["notes"] + ".\n\n" + markdown_table(
            [{"call": k, **v} for k, v in lora["calls_ms"].items()], ["call", "p50_ms", "p90_ms", "mean_ms", "n"])
            + f"\nmerged UNet file per user: {lora['merged_model_mb_per_user']} MB; session load "
              f"{lora['session_load_ms']} ms; max |runtime - merged| = {lora['max_abs_diff_runtime_vs_merged']:.2e}\n")
    for case, rows in (result.get("load") or {}).items():
        md.append(f"## Load: {case} (Triton gRPC, closed loop, warm-up excluded)\n\n" + markdown_table(
            [{**r, "error_kinds": "; ".join(f"{n}× {k}" for k, n in r["error_kinds"].items())} for r in rows],
            ["concurrency", "requests", "ok", "errors", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms",
             "throughput_rps", "error_kinds"]))
    stage_rows = [{"case": case, "model": m, **row} for case, models in (result.get("stages") or {}).items()
                  for m, row in models.items()]
    if stage_rows:
        md.append("## Stage breakdown (Triton statistics, ms per request, server side)\n\n" + markdown_table(
            stage_rows, ["case", "model", "requests", "failed", "executions", "avg_batch", *STAGES, "total_ms"]))
    md.extend(render_server_metrics(result.get("server_metrics") or {}))
    portrait = result.get("portrait") or {"status": "not measured"}
    md.append(f"## Portrait\n\nportrait: {portrait['status']}"
              + (f" ({portrait['reason']})" if portrait.get("reason") else "") + "\n")
    if portrait.get("report"):
        md.append("portrait report (one call):\n\n```json\n" + json.dumps(portrait["report"], indent=1)[:3000] + "\n```\n")
    md.append("## Figures\n\n" + "".join(f"![{k}]({v})\n\n" for k, v in figures.items()))
    if result.get("server"):
        srv = result["server"]
        md.append(f"Served models: {', '.join(srv.get('served', []))}. "
                  + ("Load errors: " + "; ".join(f"{k}: {v}" for k, v in srv["load_errors"].items())
                     if srv.get("load_errors") else "No load errors.") + "\n")
    errors = result.get("errors") or {}
    md.append("## Errors\n\n" + ("".join(f"- {k}: {v}\n" for k, v in errors.items()) if errors else "none\n"))
    return "\n".join(md)


def render_server_metrics(scraped: dict[str, dict]) -> list[str]:
    """Markdown of the /metrics scrapes: facetron's per-stage metrics and Triton's per-model ones, per case."""
    if not scraped:
        return []
    md = ["## Server metrics (/metrics scraped before and after each sweep)\n\n"
          "`facetron_*` come from inside the python models (facetron.metrics): ms per denoising step, "
          "per portrait stage, LoRA-bank hits/misses, candidates filtered. `nv_inference_*` are Triton's own per "
          "model (request = queue + compute + overhead), beside the statistics API's breakdown above.\n"]
    stage_rows, model_rows, other = [], [], []
    for case, fig in scraped.items():
        if fig.get("error"):
            other.append(f"- {case}: {fig['error']}")
            continue
        step = fig.get("denoise_step")
        if step:
            stage_rows.append({"case": case, "stage": "denoise step", "calls": step["steps"],
                               "ms_per_call": step["mean_ms"], "detail": f"p50≈{step['p50_ms_approx']} ms, "
                                                                         f"p90≈{step['p90_ms_approx']} ms"})
        for stage, row in (fig.get("stages") or {}).items():
            stage_rows.append({"case": case, "stage": stage, **row, "detail": ""})
        for model, row in (fig.get("triton_models") or {}).items():
            model_rows.append({"case": case, "model": model, **row})
        for key in ("lora_bank", "candidates", "merged_models_loaded"):
            if key in fig:
                other.append(f"- {case}: {key} {json.dumps(fig[key])}")
    if stage_rows:
        md.append(markdown_table(stage_rows, ["case", "stage", "calls", "ms_per_call", "detail"]))
    elif any(not f.get("error") for f in scraped.values()):
        md.append("No `facetron_*` samples in these runs (the serving modules record them once "
                  "facetron.metrics is wired in; see the module's doc).\n")
    if model_rows:
        md.append(markdown_table(model_rows, ["case", "model", "requests", "request_ms", "queue_ms",
                                              "compute_infer_ms"]))
    if other:
        md.append("\n".join(other) + "\n")
    return md


def write_report(result: dict, name: str = "all", out_dir: Path | None = None) -> list[Path]:
    """JSON + Markdown via report.write_result, PNGs beside them; returns the paths."""
    from facetron.benchmarks import plots

    machine = machine_info()
    footer = plots.footer_text(machine) + f" | {_dt.date.today().isoformat()}"
    stem = result_stem(name) if out_dir is None else Path(out_dir) / result_stem(name).name
    written: list[Path] = []
    figures: dict[str, str] = {}
    ratios = [(k, r) for k, r, _ in headline(result)]
    jobs = [("latency percentiles vs concurrency", "latency", result.get("load"), plots.plot_latency),
            ("stage breakdown", "stages", result.get("stages"), plots.plot_stages),
            ("pair ratios", "ratios", ratios, plots.plot_ratios)]
    for title, suffix, data, plot in jobs:
        if not data:
            continue
        try:  # a figure that fails must not cost the JSON and Markdown
            written.append(plot(data, stem.parent / f"{stem.name}-{suffix}.png", footer))
            figures[title] = written[-1].name
        except Exception as exc:
            result.setdefault("errors", {})[f"plot:{suffix}"] = f"{type(exc).__name__}: {exc}"
    result["figures"] = figures
    json_path = write_result(name, result, render_markdown(result, machine, figures), out_dir=out_dir)
    return [json_path, json_path.with_suffix(".md"), *written]


