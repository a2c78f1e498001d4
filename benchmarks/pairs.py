"""Side-by-side pairs, each timed interleaved (A B A B …) in one run.

* :func:`ort_vs_torch` — ONNX Runtime vs torch eager per diffusion net
  (``benchmarks.ort_vs_torch.measure``), tiny spec; SD-1.5 shapes with
  ``full``.
* :func:`runtime_lora_vs_merged` — one runtime-LoRA UNet graph (LoRA tensors
  as inputs) vs merged per-user UNets, in ONNX Runtime (and, for one user,
  in the served OpenVINO runtime), for 1 user and for 8 users taking turns
  (:func:`write_runtime_lora`: that pair alone, ``facetron bench lora``). Merged with 8 users is measured twice: all sessions
  resident (memory × users) and one session at a time, loaded on every user
  change (the "reload" of serving mode 1).
* :func:`triton_vs_inprocess` — the same model and inputs through a real
  Triton server over gRPC vs called in this process.
* :func:`embedder_vs_dlib` — ``benchmarks.faces.bench_embedder`` (ONNX
  embedder vs torch vs dlib-bin).

Ratios are what to read: on 2 shared cores absolute times drift between
runs, the alternation makes both sides of a pair see the same drift.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from facetron.benchmarks.timing import interleaved, summarize
from facetron.contract import DEFAULT_W_FACE

DIFFUSION_NETS = ("text_encoder", "unet", "vae_decoder")


def _p50(stats: dict) -> float:
    return float(stats["p50_ms"])


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


# ----------------------------------------------------------------------------- ORT vs torch


def ort_vs_torch(spec: str = "tiny", repeats: int = 5, models: Sequence[str] = DIFFUSION_NETS,
                 work_dir: Path | None = None) -> dict[str, dict]:
    """``measure`` for each net: ``ort_over_torch`` < 1 means ONNX Runtime is faster."""
    from facetron.benchmarks.ort_vs_torch import measure

    out = {}
    for name in models:
        r = measure(name, spec=spec, repeats=repeats, work_dir=work_dir)
        out[name] = {k: r[k] for k in ("model", "spec", "batch", "latent", "repeats", "torch_ms", "ort_ms",
                                       "ort_over_torch", "max_abs_diff", "export_s", "session_s")}
        out[name]["torch_over_ort"] = round(r["torch_ms"] / r["ort_ms"], 3) if r["ort_ms"] else None
    return out


# ----------------------------------------------------------------------------- runtime LoRA vs merged


def _ort_session(path: Path):
    """A CPU session whose threads do not spin after a run: with several sessions
    taking turns, spinning pools of idle sessions would steal the 2 cores."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class _Cycle:
    """Round-robin over users: each call of ``next()`` gives the next user index."""

    def __init__(self, n: int):
        self.n, self.i = n, -1

    def next(self) -> int:
        self.i = (self.i + 1) % self.n
        return self.i


def _openvino_calls(rt_path: Path, merged_path: Path, feed: dict, lora: dict) -> tuple[dict, dict]:
    """(calls, errors): the served OpenVINO runtime (static graph per feed shape) for both UNets
    (the runtime-LoRA one with ``reuse_inputs``, as the ``unet`` model opens it)."""
    from facetron.net_runtimes import open_runtime

    calls, errors = {}, {}
    try:
        rt = open_runtime(rt_path, "openvino", fallback=False, cache=False, reuse_inputs=True)
        merged = open_runtime(merged_path, "openvino", fallback=False, cache=False)
        full = {**feed, **lora}
        calls["runtime_1user_openvino"] = lambda: rt.run(["noise_pred"], full)
        calls["merged_1user_openvino"] = lambda: merged.run(["noise_pred"], feed)
        for call in calls.values():
            call()  # compile the static graph of this shape before timing
    except Exception as exc:  # noqa: BLE001 - OpenVINO missing or failing is a result, not a crash
        calls, errors["openvino"] = {}, f"{type(exc).__name__}: {exc}"[:300]
    return calls, errors


def runtime_lora_vs_merged(users: int = 8, repeats: int = 16, rank: int = 16, lora_rank: int = 4,
                           work_dir: Path | None = None) -> dict:
    """Runtime-LoRA UNet vs merged UNets (tiny model, batch 2 = one guidance step).

    ``rank``: the runtime graph's LoRA rank (the served repository's default
    is 16: face + style LoRA); each synthetic user's LoRA has ``lora_rank``
    and is zero-padded to it, as in serving.

    Two interleaved groups: the one-user pair alone (ONNX Runtime: LoRA as
    numpy inputs, and resident through IOBinding; the served OpenVINO
    runtime, static graphs, for both UNets), then the multi-user calls with
    the session loads of merged mode. The one-user pair is measured in the
    second group too (``*_after_reload``): a session load evicts the caches,
    so whatever runs right after it looks slower — the way this pair was
    measured up to 2026-12-01."""
    from facetron.diffusion.base_model import load_base_model
    from facetron.diffusion.lora_inputs import lora_inputs_for, read_lora_manifest, stack_lora_inputs
    from facetron.export.merge import merge_loras
    from facetron.export.onnx_export import export_model
    from facetron.export.onnx_graph import ModelDims, example_inputs, model_io
    from facetron.export.runtime_lora import export_runtime_lora_unet
    from facetron.net_runtimes import open_runtime
    from facetron.training.random_lora import write_random_lora

    base = load_base_model()
    dims = ModelDims.of(base)
    feed = example_inputs(model_io("unet", dims)[0], dims, batch=2, seed=0)
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="facetron-bench-lora-") as tmp:
        tmp = Path(tmp)
        loras = [write_random_lora(tmp / f"user{u}.safetensors", base.unet, rank=lora_rank, alpha=8.0,
                                   seed=1000 + u, std=0.05) for u in range(users)]
        rt_path = export_runtime_lora_unet(base.unet, tmp / "runtime", dims=dims, rank=rank)
        manifest = read_lora_manifest(rt_path.parent)
        lora_in = [lora_inputs_for(lora, manifest, batch=2) for lora in loras]
        merged_paths = [export_model("unet", tmp / f"merged{u}", unet=merge_loras(base, lora, w_face=1.0)[0], dims=dims)
                        for u, lora in enumerate(loras)]
        merged_bytes = sum(f.stat().st_size for f in merged_paths[0].parent.iterdir())
        runtime = _ort_session(rt_path)
        served = open_runtime(rt_path, "onnxruntime", reuse_inputs=True)  # as the served ``unet`` opens it
        resident = [_ort_session(p) for p in merged_paths]
        got = runtime.run(None, {**feed, **lora_in[0]})[0]
        ref = resident[0].run(None, feed)[0]
        mixed = {**{k: np.concatenate([v] * users) for k, v in feed.items()}, **stack_lora_inputs(lora_in, manifest)}

        one_user: dict[str, Callable[[], object]] = {
            "runtime_1user": lambda: runtime.run(None, {**feed, **lora_in[0]}),
            "merged_1user": lambda: resident[0].run(None, feed),
            "runtime_1user_resident": lambda: served.run(None, {**feed, **lora_in[0]}),
        }
        ov_calls, errors = _openvino_calls(rt_path, merged_paths[0], feed, lora_in[0])
        one_user.update(ov_calls)
        deviations = {k: float(np.abs(np.asarray(call()[0], np.float64) - ref).max())
                      for k, call in one_user.items() if k != "merged_1user"}
        samples = interleaved(one_user, repeats=repeats, warmup=2)

        rt_cycle, res_cycle, load_cycle = _Cycle(users), _Cycle(users), _Cycle(users)
        loaded: dict = {}

        def merged_reload() -> None:
            """Serving mode 1 with one model slot: load the next user's UNet, then run it."""
            loaded.clear()  # drop the previous user's session first (one resident at a time)
            sess = _ort_session(merged_paths[load_cycle.next()])
            loaded["s"] = sess
            sess.run(None, feed)

        calls: dict[str, Callable[[], object]] = {
            "runtime_1user_after_reload": one_user["runtime_1user"],
            "merged_1user_after_reload": one_user["merged_1user"],
            f"runtime_{users}users": lambda: runtime.run(None, {**feed, **lora_in[rt_cycle.next()]}),
            f"merged_{users}users_resident": lambda: resident[res_cycle.next()].run(None, feed),
            f"merged_{users}users_reload": merged_reload,
            f"runtime_{users}users_one_batch": lambda: runtime.run(None, mixed),
            "session_load": lambda: _ort_session(merged_paths[0]),
        }
        samples.update(interleaved(calls, repeats=repeats, warmup=1))
    samples[f"runtime_{users}users_one_batch"] = samples[f"runtime_{users}users_one_batch"] / users  # per user
    stats = {k: summarize(v) for k, v in samples.items()}
    p = {k: _p50(v) for k, v in stats.items()}
    out = {
        "model": "tiny UNet, batch 2 (one guidance step), ONNX Runtime CPU (+ OpenVINO static for the 1-user pair)",
        "users": users, "runtime_rank": rank, "user_lora_rank": lora_rank, "repeats": repeats,
        "calls_ms": stats,
        "runtime_over_merged_1user": _ratio(p["runtime_1user"], p["merged_1user"]),
        "runtime_resident_over_merged_1user": _ratio(p["runtime_1user_resident"], p["merged_1user"]),
        "runtime_over_merged_1user_after_reload": _ratio(p["runtime_1user_after_reload"],
                                                         p["merged_1user_after_reload"]),
        f"runtime_over_merged_{users}users_resident": _ratio(p[f"runtime_{users}users"],
                                                             p[f"merged_{users}users_resident"]),
        f"runtime_over_merged_{users}users_reload": _ratio(p[f"runtime_{users}users"],
                                                           p[f"merged_{users}users_reload"]),
        "one_batch_per_user_over_runtime_call": _ratio(p[f"runtime_{users}users_one_batch"], p[f"runtime_{users}users"]),
        "reload_ms_per_user_change": round(p[f"merged_{users}users_reload"] - p[f"merged_{users}users_resident"], 3),
        "session_load_ms": p["session_load"],
        "merged_model_mb_per_user": round(merged_bytes / 2**20, 2),
        "max_abs_diff_runtime_vs_merged": float(np.abs(got.astype(np.float64) - ref).max()),
        "max_abs_diff_vs_merged_ort": deviations,
        "errors": errors,
        "goal": "runtime LoRA <= 1.05x merged at one user",
        "notes": f"1-user group (alone): runtime = LoRA tensors as numpy inputs on every call, runtime_resident = "
                 f"as served (reuse_inputs: the same LoRA arrays stay bound through IOBinding), *_openvino = the served OpenVINO runtime (a static graph per feed shape); "
                 f"{users} users: runtime = next user's LoRA tensors as inputs (no reload); merged_resident = "
                 f"{users} sessions kept loaded; merged_reload = one session, re-created on each user change; "
                 f"one_batch = all {users} users' requests in one batch, time per user; *_after_reload = the 1-user "
                 f"pair interleaved with the session loads (as measured before 2026-12-01)",
    }
    if "runtime_1user_openvino" in p:
        out["runtime_openvino_over_merged_openvino_1user"] = _ratio(p["runtime_1user_openvino"],
                                                                    p["merged_1user_openvino"])
        out["runtime_openvino_over_merged_ort_1user"] = _ratio(p["runtime_1user_openvino"], p["merged_1user"])
    return out


def runtime_lora_vs_merged_sd15(repeats: int = 8, lora_rank: int = 4, work_dir: Path | None = None) -> dict:
    """SD-1.5 shapes (random weights), one user, batch 2: the served runtime-LoRA UNet graph (the step-cache
    full graph the ``unet`` model serves, the user's rank-``lora_rank`` face LoRA sent at its rank bucket, as
    the bank sends it) vs the UNet with that LoRA merged in. Per runtime as served (ONNX Runtime fp32;
    OpenVINO bf16 static), each pair alone in memory and timed interleaved. Minutes and ~12 GB: run alone."""
    import gc

    from facetron.benchmarks.ort_vs_torch import _nets
    from facetron.diffusion.lora_inputs import lora_inputs_for, read_lora_manifest
    from facetron.export.merge import merge_loras
    from facetron.export.onnx_export import export_model
    from facetron.export.onnx_graph import example_inputs, model_io
    from facetron.export.step_cache_graphs import export_runtime_lora_deep_cache_unet
    from facetron.net_runtimes import open_runtime
    from facetron.training.random_lora import write_random_lora

    w_face, out = DEFAULT_W_FACE, {"model": "SD-1.5-shape UNet (random weights), batch 2 (one guidance step), 1 user",
                        "user_lora_rank": lora_rank, "repeats": repeats, "pairs": {}}
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="facetron-bench-lora-sd15-") as tmp:
        tmp = Path(tmp)
        base, dims = _nets("sd15")
        lora = write_random_lora(tmp / "user.safetensors", base.unet, rank=lora_rank, alpha=32.0, seed=1000, std=0.01)
        rt_path, _ = export_runtime_lora_deep_cache_unet(base.unet, tmp, dims=dims, rank=16)
        merged_unet, _ = merge_loras(base, lora, w_face=w_face, inplace=True)
        merged_path = export_model("unet", tmp / "merged", unet=merged_unet, dims=dims)
        del base, merged_unet
        gc.collect()
        feed = example_inputs(model_io("unet", dims)[0], dims, batch=2, seed=0)
        full = {**feed, **lora_inputs_for(lora, read_lora_manifest(rt_path.parent), w_face, batch=2)}
        for runtime, precision in (("onnxruntime", "f32"), ("openvino", "bf16")):
            label = runtime if precision == "f32" else f"{runtime}_{precision}"
            try:
                rt = open_runtime(rt_path, runtime, 2, cache=False, fallback=False, reuse_inputs=True,
                                  precision=precision)
                merged = open_runtime(merged_path, runtime, 2, cache=False, fallback=False, precision=precision)
                got, ref = rt.run(["noise_pred"], full)[0], merged.run(["noise_pred"], feed)[0]  # + compile
                samples = interleaved({"runtime": lambda: rt.run(["noise_pred"], full),
                                       "merged": lambda: merged.run(["noise_pred"], feed)}, repeats=repeats, warmup=1)
                stats = {k: summarize(v) for k, v in samples.items()}
                out["pairs"][label] = {"calls_ms": stats, "runtime_over_merged": _ratio(
                    _p50(stats["runtime"]), _p50(stats["merged"])), "max_abs_runtime_vs_merged": float(
                    np.abs(got.astype(np.float64) - ref).max())}
            except Exception as exc:  # noqa: BLE001 - one runtime failing is a result
                out["pairs"][label] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            finally:
                rt = merged = None
                gc.collect()
            print(f"[bench lora] sd15 {label}: {out['pairs'][label].get('runtime_over_merged')}", flush=True)
    out["goal"] = "runtime LoRA <= 1.05x merged at one user"
    return out


def write_runtime_lora(users: int = 8, repeats: int = 30, out_dir: Path | None = None, full: bool = False) -> dict:
    """``facetron bench lora``: :func:`runtime_lora_vs_merged` alone, written as
    ``<date>-<machine>-runtime-lora.{json,md,png}`` (tiny model, well under a minute); ``full`` adds
    :func:`runtime_lora_vs_merged_sd15` (minutes, ~12 GB) under ``sd15``."""
    import os

    from facetron.benchmarks.machine import machine_info
    from facetron.benchmarks.plots import footer_text, plot_ratios
    from facetron.benchmarks.report import markdown_table, write_result
    from facetron.benchmarks.runtimes import cpu_description

    load0 = [round(x, 2) for x in os.getloadavg()]
    r = runtime_lora_vs_merged(users=users, repeats=repeats)
    if full:
        r["sd15"] = runtime_lora_vs_merged_sd15()
        for label, pair in r["sd15"]["pairs"].items():
            r[f"sd15_runtime_over_merged_1user_{label}"] = pair.get("runtime_over_merged")
    r["cpu"] = cpu_description()
    r["loadavg_start"], r["loadavg_end"] = load0, [round(x, 2) for x in os.getloadavg()]
    ratios = [(k, v) for k, v in r.items() if "_over_" in k and isinstance(v, (int, float))]
    md = (f"{r['model']}; {r['notes']}.\n\nCPU: {r['cpu']['model']} ({', '.join(r['cpu']['kernel_flags'])}); "
          f"p50 of {repeats} interleaved calls; load average {r['loadavg_start']} -> {r['loadavg_end']}. "
          f"Goal: {r['goal']}.\n\n"
          + markdown_table([{"ratio (A / B of p50)": k, "value": v} for k, v in ratios], ["ratio (A / B of p50)", "value"])
          + "\n" + markdown_table([{"call": k, **v} for k, v in r["calls_ms"].items()],
                                  ["call", "p50_ms", "p90_ms", "mean_ms", "n"])
          + "\nmax |x - merged (ORT)|: " + ", ".join(f"{k} {v:.2e}" for k, v in r["max_abs_diff_vs_merged_ort"].items())
          + (f"\n\nerrors: {r['errors']}" if r["errors"] else "") + "\n")
    json_path = write_result("runtime-lora", r, md, out_dir=out_dir)
    png = plot_ratios(ratios, json_path.with_name(json_path.stem + ".png"), footer_text(machine_info()))
    r["files"] = [str(json_path), str(json_path.with_suffix(".md")), str(png)]
    return r


# ----------------------------------------------------------------------------- Triton vs in-process


def triton_vs_inprocess(url: str, repeats: int = 10, select_candidates: int = 2) -> dict[str, dict]:
    """Same model, same inputs: ``FacetronClient.infer`` over gRPC vs the in-process call.

    The in-process side runs the code the python-backend model runs (same
    ONNX nets); ``overhead_ms`` = p50 Triton - p50 in-process. The server is
    a separate process with its own threads, so a negative overhead can
    happen for CPU-heavy models: read it as "no measurable overhead"."""
    from facetron.benchmarks.load import preset
    from facetron.client import FacetronClient
    from facetron.diffusion.clip_tokenizer import ClipTokenizer
    from facetron.faces.detector import FaceDetector
    from facetron.faces.embedder import FaceEmbedder
    from facetron.pipeline.net_io import pack_detections
    from facetron.pipeline.selection import select_portraits

    tok, det, emb = ClipTokenizer(), FaceDetector(), FaceEmbedder()
    detect = lambda x: pack_detections(det.detect_batch(list(x)))  # noqa: E731
    cases = {name: preset(name, candidates=select_candidates)
             for name in ("tokenizer", "face_embedder", "face_detector", "face_select")}
    prompts = [p.decode() for p in cases["tokenizer"].inputs["prompt"]]
    chips, photo = cases["face_embedder"].inputs["faces"], cases["face_detector"].inputs["images"]
    sel = cases["face_select"].inputs
    local = {
        "tokenizer": lambda: tok(prompts),
        "face_embedder": lambda: emb.embed(chips),
        "face_detector": lambda: detect(photo),
        "face_select": lambda: select_portraits(sel["images"], sel["reference_embedding"], 0, detect, emb.embed),
    }
    out = {}
    with FacetronClient(url, timeout_s=120) as client:
        for name, case in cases.items():
            remote = lambda c=case: client.infer(c.model, dict(c.inputs), list(c.outputs))  # noqa: E731
            s = interleaved({"triton": remote, "inprocess": local[name]}, repeats=repeats, warmup=2)
            t, i = summarize(s["triton"]), summarize(s["inprocess"])
            out[case.name] = {"triton": t, "inprocess": i, "overhead_ms": round(t["p50_ms"] - i["p50_ms"], 3),
                              "triton_over_inprocess": _ratio(t["p50_ms"], i["p50_ms"])}
    return out


# ----------------------------------------------------------------------------- embedder vs dlib-bin


def embedder_vs_dlib(repeats: int = 5) -> dict:
    """``benchmarks.faces.bench_embedder``: per-face ms of ONNX (b1, b16), torch, dlib-bin."""
    from facetron.benchmarks.faces import bench_embedder
    from facetron.faces.detector import FaceDetector
    from facetron.faces.embedder import FaceEmbedder

    return bench_embedder(FaceDetector(), FaceEmbedder(), repeats)
