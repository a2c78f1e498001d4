"""``facetron evaluate --user ID``: the identity report through a real server
(tiny model: no generated faces, and the report says so), its statistics,
and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from facetron.benchmarks.identity import summarize
from facetron.imageio import load_image
from user_tokens import grant  # noqa: E402


def _cli(argv: list[str]) -> int:
    from facetron import cli

    try:
        return cli.main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def test_summary_statistics() -> None:
    sims = [0.9, None, 0.8, 0.7, float("nan"), 0.6]
    s = summarize(sims)
    assert s["samples"] == 6 and s["one_face"] == 4 and s["share_one_face"] == pytest.approx(4 / 6, abs=1e-4)
    assert s["mean"] == pytest.approx(0.75) and s["p10"] == pytest.approx(np.percentile([0.6, 0.7, 0.8, 0.9], 10))
    assert summarize([None, None]) == {"samples": 2, "one_face": 0, "share_one_face": 0.0, "mean": None, "p10": None}


@pytest.mark.parametrize("extra, message", [
    (["--images-per-prompt", "0"], "--images-per-prompt: must be >= 1 pictures per prompt and style, got 0"),
    (["--styles", " , "], "--styles: name at least one style"),
    (["--user", "../x"], "--user: '../x' is not a valid user id"),
    (["--server", "nohost"], "--server: 'nohost' is not host:port"),
])
def test_bad_arguments(extra, message, tmp_path: Path, capsys) -> None:
    argv = ["evaluate", "--user", "someone", "--server", "127.0.0.1:1", "--out", str(tmp_path / "o"), *extra]
    assert _cli(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"facetron evaluate: error: {message}")
    assert not (tmp_path / "o").exists()


@pytest.fixture()
def evaluser(users_dir: Path, tmp_path: Path) -> str:
    """A registered user: the astronaut's reference embedding + a random LoRA (tiny model)."""
    from face_photos import photo
    from facetron.diffusion.base_model import load_base_model
    from facetron.faces.alignment import align_faces
    from facetron.faces.detector import FaceDetector
    from facetron.faces.embedder import FaceEmbedder
    from facetron.training.random_lora import write_random_lora
    from facetron.users import UserRegistry

    registry = UserRegistry(users_dir)
    if not registry.exists("evaluser"):
        astro = photo("astronaut")
        lm = FaceDetector().detect(astro).landmarks[:1]
        registry.save_reference_embedding("evaluser", FaceEmbedder().embed(align_faces(astro, lm)))
        grant(registry, "evaluser")
        lora = write_random_lora(tmp_path / "l.safetensors", load_base_model().unet, rank=4, alpha=4, seed=5, std=0.3)
        registry.install_lora("evaluser", lora)
    return "evaluser"


@pytest.mark.triton
def test_evaluate_end_to_end(triton, evaluser, tmp_path: Path, capsys) -> None:
    out = tmp_path / "report"
    argv = ["evaluate", "--user", evaluser, "--server", triton.grpc_url, "--styles", "studio,outdoor",
            "--images-per-prompt", "2", "--steps", "2", "--size", "128", "--out", str(out)]
    assert _cli(argv) == 0, capsys.readouterr().err
    doc = json.loads((out / "identity_report.json").read_text())
    assert doc["overall"]["samples"] == 2 * 2 * 2 and set(doc["by_style"]) == {"studio", "outdoor"}
    assert [s["seed"] for s in doc["samples"][:2]] == [doc["settings"]["seed"], doc["settings"]["seed"] + 1]
    # the tiny smoke model makes no faces: the report is empty of identity numbers and says why
    assert doc["overall"]["share_one_face"] == 0.0 and doc["overall"]["mean"] is None
    assert "tiny smoke model" in doc["note"]
    md = (out / "identity_report.md").read_text()
    assert "| all | 8 | 0 |" in md and "| studio |" in md
    assert load_image(out / "identity_report.png").shape[2] == 3
    assert "0/8 pictures with one face" in capsys.readouterr().out
    # the same seeds give the same pictures: a second run reports the same samples
    assert _cli(argv[:-1] + [str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "identity_report.json").read_text())
    assert again["samples"] == doc["samples"]
    np.testing.assert_array_equal(load_image(out / "identity_report.png"), load_image(tmp_path / "again" / "identity_report.png"))
    # an unknown user is named
    assert _cli(["evaluate", "--user", "nobody", "--server", triton.grpc_url, "--images-per-prompt", "1",
                 "--steps", "1", "--size", "128", "--out", str(tmp_path / "x")]) == 2
    assert "unknown user 'nobody'" in capsys.readouterr().err
