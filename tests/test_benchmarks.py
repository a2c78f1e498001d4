"""Smoke tests of the benchmark harness: load driver, statistics breakdown,
report files, GPU script on CPU. No timing is asserted — only that every
request is accounted for, errors are counted (not hidden) and files are valid."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from facetron.benchmarks.load import LoadCase, preset, run_load, sweep
from facetron.benchmarks.triton_stats import STAGES, StatsDelta
from facetron.paths import REPO_ROOT

GPU_SCRIPT = REPO_ROOT / "benchmarks" / "gpu_script.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.triton
def test_load_run_accounts_for_every_request(triton) -> None:
    r = run_load(triton.grpc_url, preset("tokenizer"), 3, requests=12).summary()
    assert (r["requests"], r["ok"], r["errors"], r["error_kinds"]) == (12, 12, 0, {})
    assert all(r[k] is not None and r[k] > 0 for k in ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms"))
    assert r["p50_ms"] <= r["p99_ms"] and r["throughput_rps"] > 0


@pytest.mark.triton
def test_bad_requests_are_counted_as_errors(triton) -> None:
    bad = LoadCase("tokenizer", {"prompt": np.array([[b"a", b"b"]], dtype=object)}, ["input_ids"], label="bad")
    r = run_load(triton.grpc_url, bad, 2, requests=5, warmup=0).summary()
    assert (r["ok"], r["errors"], r["error_rate"]) == (0, 5, 1.0)
    assert r["p50_ms"] is None and r["throughput_rps"] == 0
    (kind, count), = r["error_kinds"].items()
    assert count == 5 and "INVALID_ARGUMENT" in kind and "prompt" in kind
    missing = run_load(triton.grpc_url, LoadCase("no_such_model", {"x": np.zeros(1, np.float32)}, ["y"]), 1,
                       requests=2, warmup=0).summary()
    assert missing["errors"] == 2 and "no_such_model" in next(iter(missing["error_kinds"]))


@pytest.mark.triton
def test_sweep_levels_and_stats_breakdown_show_bls_children(triton, client) -> None:
    case = preset("face_select", candidates=2)
    with StatsDelta(client) as stats:
        rows = sweep(triton.grpc_url, case, (1, 2), per_worker=1, warmup=0)
    assert [(r["concurrency"], r["requests"], r["errors"]) for r in rows] == [(1, 1, 0), (2, 2, 0)]
    br = stats.result
    assert {"face_select", "face_detector"} <= set(br)  # the BLS child shows up under its own name
    assert br["face_select"]["requests"] == 3 and br["face_select"]["failed"] == 0
    for row in br.values():
        assert all(row[s] is not None and row[s] >= 0 for s in STAGES)
        assert row["compute_infer_ms"] > 0


@pytest.mark.triton
def test_report_files_json_markdown_png(triton, tmp_path) -> None:
    from facetron.benchmarks import pairs
    from facetron.benchmarks.suite import Settings, run_sweeps, write_report

    s = Settings(concurrency=(1, 2), per_worker={"tokenizer": 2})
    result: dict = {"suite": {"mode": "test", "parts": ["load", "pairs"]},
                    "pairs": {"triton_vs_inprocess": pairs.triton_vs_inprocess(triton.grpc_url, repeats=1)}}
    run_sweeps(triton.grpc_url, [preset("tokenizer")], s, result)
    result["wall_s"] = 0.0
    files = write_report(result, "smoke", tmp_path)
    doc = json.loads(files[0].read_text())
    assert doc["benchmark"] == "smoke" and doc["machine"]["git"] and doc["machine"]["packages"]["torch"]
    assert doc["load"]["tokenizer"][1]["concurrency"] == 2 and "errors" not in doc
    md = files[1].read_text()
    assert "| concurrency | requests | ok | errors | p50_ms |" in md and "## Machine" in md and "git" in md
    assert "portrait: not measured" in md
    pngs = [f for f in files if f.suffix == ".png"]
    assert {p.name.rsplit("-", 1)[1] for p in pngs} == {"latency.png", "stages.png", "ratios.png"}
    for p in pngs:
        assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 5000


def test_bench_cli_parses_suite_options() -> None:
    from facetron.cli import build_parser

    args = build_parser().parse_args(["bench", "all", "--full", "--quick"])
    assert args.full and args.quick and callable(args.func)
    assert callable(build_parser().parse_args(["bench", "faces"]).func)
    args = build_parser().parse_args(["bench", "load", "--url", "127.0.0.1:1", "--model", "tokenizer"])
    assert args.model == ["tokenizer"]


def test_runtime_lora_benchmark_smoke(tmp_path) -> None:
    """``facetron bench lora`` (benchmarks/pairs.py): every call runs, each runtime-LoRA
    variant equals the merged UNet within the export tolerance, files are written.
    No timing is asserted."""
    from facetron.benchmarks.pairs import write_runtime_lora
    from facetron.cli import build_parser

    args = build_parser().parse_args(["bench", "lora", "--users", "2", "--repeats", "2"])
    assert args.users == 2 and args.repeats == 2 and callable(args.func)
    r = write_runtime_lora(users=2, repeats=2, out_dir=tmp_path)
    assert not r["errors"], r["errors"]
    assert {"runtime_1user", "merged_1user", "runtime_1user_resident", "runtime_1user_openvino",
            "merged_1user_openvino", "runtime_1user_after_reload", "merged_2users_reload"} <= set(r["calls_ms"])
    assert all(v < 1e-4 for v in r["max_abs_diff_vs_merged_ort"].values()), r["max_abs_diff_vs_merged_ort"]
    assert r["runtime_over_merged_1user"] > 0 and r["runtime_openvino_over_merged_openvino_1user"] > 0
    json_path, md_path, png_path = map(Path, r["files"])
    assert json.loads(json_path.read_text())["benchmark"] == "runtime-lora"
    assert "runtime_over_merged_1user" in md_path.read_text() and png_path.read_bytes()[:8] == PNG_MAGIC


def test_gpu_script_runs_on_cpu_tiny(tmp_path) -> None:
    cmd = [sys.executable, str(GPU_SCRIPT), "--device", "cpu", "--tiny", "--steps", "2", "--repeats", "1",
           "--warmup", "0", "--images", "1", "--out", str(tmp_path), "--git", "test"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = tmp_path.glob("*-gpu-tiny.json")
    doc = json.loads(path.read_text())
    assert doc["benchmark"] == "gpu" and doc["machine"]["git"] == "test" and doc["shapes"] == "tiny"
    assert {"text_encoder_b2", "unet_step_b2", "vae_decode_b1", "image_2_steps"} <= set(doc["results"])
    assert "| unet_step_b2 |" in path.with_suffix(".md").read_text()


def test_gpu_script_needs_neither_diffusers_nor_transformers(tmp_path) -> None:
    argv = ["gpu_script.py", "--device", "cpu", "--tiny", "--steps", "2", "--repeats", "1", "--warmup", "0",
            "--images", "1", "--out", str(tmp_path), "--git", "test"]
    code = ("import runpy, sys; sys.modules['diffusers'] = None; sys.modules['transformers'] = None; "
            f"sys.argv = {argv!r}; runpy.run_path({str(GPU_SCRIPT)!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = tmp_path.glob("*-gpu-tiny.json")
    assert json.loads(path.read_text())["results"]["image_2_steps"]["n"] == 1


@pytest.mark.slow
def test_quick_suite_writes_results(tmp_path) -> None:
    from facetron.benchmarks.suite import run_suite

    result = run_suite(quick=True, out_dir=tmp_path, build_dir=tmp_path / "build")
    assert not result.get("errors"), result.get("errors")
    assert result["portrait"]["status"] in ("served", "not served yet")
    assert all(p.exists() for p in map(__import__("pathlib").Path, result["files"]))


def test_training_benchmark_measures_steps() -> None:
    from facetron.benchmarks.training import measure

    row = measure(None, 3, 64)
    assert row["steps"] == 3 and row["steps_per_s"] > 0 and row["first_step_s"] is not None
