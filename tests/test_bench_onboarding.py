"""``facetron bench onboarding`` in pieces (the whole tiny run takes ~6 minutes on 2 cores: run it by hand):
the training extrapolation's arithmetic, FaceChain's step rule, a stage's peak memory seen in a child process,
the report (JSON + Markdown + PNG) of a synthetic result, and the CLI's options."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from facetron.benchmarks import onboarding
from facetron.errors import InvalidInputError


def test_training_is_extrapolated_at_the_median_steady_step() -> None:
    # first step 9 s (excluded), steady steps 2, 3 and 100 s: median 3 s; 796 steps not run
    row = onboarding.extrapolate_train(20.0, [9.0, 2.0, 3.0, 100.0], 800)
    assert row["extrapolated"] is True
    assert row["seconds"] == pytest.approx(20.0 + 796 * 3.0)
    assert (row["trained_steps"], row["planned_steps"], row["median_steady_step_s"]) == (4, 800, 3.0)
    assert "20.0 + (800 - 4) x 3.000 = 2408.0" in row["formula"]


def test_a_run_of_every_planned_step_is_not_extrapolated() -> None:
    row = onboarding.extrapolate_train(12.5, [1.0] * 300, 300)
    assert row["extrapolated"] is False and row["seconds"] == 12.5 and "formula" not in row
    assert onboarding.extrapolate_train(4.0, [1.0], 1)["seconds"] == 4.0  # one step, nothing to extrapolate


def test_extrapolation_needs_a_step_after_the_first() -> None:
    with pytest.raises(ValueError, match="at least one more"):
        onboarding.extrapolate_train(10.0, [5.0], 800)


@pytest.mark.parametrize("photos", [1, 3, 4, 6, 20])
def test_planned_steps_follow_facechains_rule(photos: int) -> None:
    assert onboarding.facechain_steps(photos) == min(200 * photos, 800)  # FaceChain's train_text_to_image_lora


def test_a_parts_peak_rss_includes_its_child_processes() -> None:
    from facetron.rss_monitor import RssMonitor

    alloc = 300 * 2**20
    with RssMonitor(0.05) as rss:
        stages = onboarding._Stages(rss)
        with stages.part("idle"):
            pass
        with stages.part("child"):  # a child holding 300 MiB of touched pages for a second
            subprocess.run([sys.executable, "-c", f"import time; b = b'x' * {alloc}; time.sleep(1.0)"], check=True)
    idle, child = stages.parts["idle"]["peak_rss_gib"], stages.parts["child"]["peak_rss_gib"]
    assert child - idle > 0.8 * alloc / 2**30, (idle, child)
    assert stages.parts["child"]["seconds"] >= 1.0


def _synthetic(extrapolated: bool) -> dict:
    train = onboarding.extrapolate_train(60.0, [20.0, 10.0, 12.0, 11.0], 800 if extrapolated else 4)
    train.update({"wall_s": 60.0, "peak_rss_gib": 9.5, "precision": "f32"})
    parts = {"prepare": {"seconds": 8.0, "wall_s": 8.0, "peak_rss_gib": 0.9},
             "train": train,
             "export_repository": {"seconds": 570.0, "wall_s": 570.0, "peak_rss_gib": 21.7},
             "server_start": {"seconds": 18.0, "wall_s": 18.0, "peak_rss_gib": 6.1},
             "portrait_call": {"seconds": 46.0, "wall_s": 46.0, "peak_rss_gib": 7.2}}
    result = {"spec": "sd15", "model": "sd15-shapes-random", "resolution": 512, "identity_mode": "runtime_lora",
              "note": "synthetic", "settings": {"portrait_steps": "server default"},
              "cpu": {"model": "Test CPU", "kernel_flags": ["avx2", "fma"], "flags": ["avx2", "fma"]},
              "setup_s": 19.0, "server_stop_s": 2.0, "wall_s": 721.0, "loadavg_start": None, "loadavg_end": None,
              "parts": parts}
    result["stages"] = onboarding.summarize(parts)
    result["onboarding_s"] = round(sum(s["seconds"] for s in result["stages"].values()), 1)
    result["faster_next"] = onboarding.faster_next(result)
    return result


def test_the_report_says_the_training_was_extrapolated_and_what_to_speed_up(tmp_path: Path) -> None:
    result = onboarding.write(_synthetic(extrapolated=True), out_dir=tmp_path)
    expected_train = 60.0 + 796 * 11.0
    assert result["stages"]["train"]["seconds"] == pytest.approx(expected_train, abs=0.1)
    assert result["stages"]["make_servable"]["seconds"] == 570.0
    assert result["stages"]["first_portrait"] == {"seconds": 64.0, "peak_rss_gib": 7.2, "extrapolated": False,
                                                  "parts": ["server_start", "portrait_call"]}
    assert result["onboarding_s"] == pytest.approx(8.0 + expected_train + 570.0 + 64.0, abs=0.2)
    assert result["faster_next"][0].startswith("train ") and "amx_bf16" in result["faster_next"][0]
    assert result["faster_next"][1].startswith("export_repository ")
    json_path, md_path, png_path = map(Path, result["files"])
    assert json_path.name.endswith("-onboarding-sd15.json") and json_path.parent == tmp_path
    doc = json.loads(json_path.read_text())
    assert doc["benchmark"] == "onboarding-sd15" and doc["parts"]["train"]["extrapolated"] is True
    assert "train_s = measured_s + (planned_steps - trained_steps) x median_steady_step_s" in doc["parts"]["train"][
        "formula"]
    assert doc["cpu"]["kernel_flags"] == ["avx2", "fma"] and doc["machine"]["packages"]["torch"]
    md = md_path.read_text()
    assert "Training **extrapolated**" in md and "min(200 x photos, 800) = 800" in md
    for stage in onboarding.STAGES:
        assert f"| {stage} |" in md
    assert "What would make it faster next" in md
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_fully_measured_training_is_not_called_extrapolated(tmp_path: Path) -> None:
    result = onboarding.write(_synthetic(extrapolated=False), out_dir=tmp_path)
    assert result["stages"]["train"] == {"seconds": 60.0, "peak_rss_gib": 9.5, "parts": ["train"],
                                         "extrapolated": False}
    assert "extrapolated" not in Path(result["files"][1]).read_text().lower().replace("| extrapolated |", "")


def test_cli_options(monkeypatch) -> None:
    from facetron.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["bench", "onboarding"])
    assert (args.full, args.merged, args.train_steps, args.portrait_steps, args.cpu_runtime) == (
        False, False, None, None, None)
    seen = {}

    class Stop(Exception):
        pass

    def run(**kwargs):
        seen.update(kwargs)
        raise Stop  # before any work

    monkeypatch.setattr(onboarding, "run", run)
    full = parser.parse_args(["bench", "onboarding", "--full", "--train-steps", "3", "--cpu-runtime", "onnxruntime",
                              "--portrait-steps", "5"])
    with pytest.raises(Stop):
        full.func(full)
    assert seen["full"] and seen["train_steps"] == 3 and seen["portrait_steps"] == 5
    assert (seen["cpu_runtime"], seen["precision"]) == ("onnxruntime", "f32")  # as `export repository`
    full_one = parser.parse_args(["bench", "onboarding", "--full", "--train-steps", "1"])
    with pytest.raises(InvalidInputError, match="--train-steps"):
        full_one.func(full_one)
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "onboarding", "--cpu-runtime", "tpu"])



def test_the_report_warns_when_other_work_competed_for_the_cores(tmp_path: Path) -> None:
    busy = dict(_synthetic(extrapolated=False), cores=2, loadavg_start=[1.1, 1.0, 1.4], loadavg_end=[9.1, 10.3, 8.3])
    assert "load average up to 9.1 on 2 cores" in onboarding.markdown(busy)
    quiet = dict(busy, loadavg_end=[1.9, 1.5, 1.4])
    assert "Shared machine" not in onboarding.markdown(quiet)
    own = dict(busy, loadavg_end=[2.04, 2.05, 1.99])  # the run's own two busy cores and the server's stubs
    assert "Shared machine" not in onboarding.markdown(own)
    assert "Shared machine" in onboarding.markdown(dict(busy, loadavg_end=[2.6, 2.0, 1.9]))


@pytest.mark.parametrize("reused, words", [([], "measured here"), (["unet", "vae_decoder"], "unet, vae_decoder was "
                                                                                             "reused"),
                                           (None, "measures each net")])
def test_the_export_advice_says_whether_the_runtime_choice_was_measured(reused, words: str) -> None:
    result = _synthetic(extrapolated=False)
    if reused is not None:
        result["parts"]["export_repository"]["choice_reused"] = reused
    (line,) = [x for x in onboarding.faster_next(result) if x.startswith("export_repository ")]
    assert words in line
