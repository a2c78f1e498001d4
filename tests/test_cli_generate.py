"""``facetron generate``: argument checks and one-line errors (exit 2), a real
server without the ``portrait`` model (NOT_FOUND naming it, also behind a dead
server in the list), and — once the portrait model lands — the real run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from facetron.imageio import load_image
from facetron.paths import REPO_ROOT
from facetron.triton.server import TritonServer, free_port
from user_tokens import grant  # noqa: E402

PORTRAIT_LANDED = (REPO_ROOT / "model_repository" / "portrait" / "1" / "model.py").is_file()


def facetron(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """Run the ``facetron`` CLI in-process; argparse usage errors return their code."""
    from facetron import cli

    try:
        return cli.main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def _error_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--num-images", "0"], "--num-images: must be 1..16, got 0"),
        (["--num-images", "2", "--top-k", "3"], "--top-k: must be in 0..num_images (2), got 3"),
        (["--height", "100"], "--height: must be a multiple of 8 in 32..2048, got 100"),
        (["--steps", "0"], "--steps: must be 1..150, got 0"),
        (["--guidance", "nan"], "--guidance: must be in 0..30, got nan"),
        (["--strength", "0.5"], "--strength: only applies with a template"),
        (["--fusion-strength", "1.5"], "--fusion-strength: must be in [0, 1] (0 = no fusion), got 1.5"),
        (["--user", "../etc"], "--user: '../etc' is not a valid user id"),
        (["--server", "nohost"], "--server: 'nohost' is not host:port"),
        (["--server", "127.0.0.1:1,"], None),  # trailing comma is fine: one server (then unreachable)
        (["--timeout", "0"], "--timeout: must be > 0 seconds, got 0.0"),
        (["--template", "/no/such/template.png"], "--template: no such file"),
    ],
)
def test_bad_arguments_fail_in_one_line(
    extra: list[str], message: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["generate", "--user", "demo", "--out", str(out), "--server", "127.0.0.1:1", "--retries", "1", *extra]
    assert facetron(argv, monkeypatch) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("facetron generate: error: "), lines
    if message is not None:
        assert lines[0].startswith(f"facetron generate: error: {message}"), lines[0]
    else:
        assert "127.0.0.1:1" in lines[0]
    assert not out.exists(), "nothing may be written on error"


def test_usage_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert facetron(["generate", "--out", str(tmp_path)], monkeypatch) == 2
    assert _error_lines(capsys)[-1] == "facetron generate: error: the following arguments are required: --user"
    assert facetron(["generate", "--user", "demo", "--out", str(tmp_path), "--num-images", "many"], monkeypatch) == 2
    assert _error_lines(capsys)[-1] == "facetron generate: error: argument --num-images: invalid int value: 'many'"
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    assert facetron(["generate", "--user", "demo", "--out", str(afile)], monkeypatch) == 2
    assert _error_lines(capsys) == [f"facetron generate: error: --out: {afile} exists and is not a folder"]


@pytest.fixture(scope="module")
def no_portrait_server(model_repository: Path, tmp_path_factory: pytest.TempPathFactory):
    """A real server with the tokenizer only (no ``portrait`` model)."""
    repo = tmp_path_factory.mktemp("tokenizer_only") / "model_repository"
    repo.mkdir()
    (repo / "tokenizer").symlink_to(model_repository / "tokenizer", target_is_directory=True)
    with TritonServer(repo, log_path=repo.parent / "tritonserver.log") as server:
        yield server


@pytest.mark.triton
def test_server_without_portrait_model(
    no_portrait_server: TritonServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    url = no_portrait_server.grpc_url
    expected = "facetron generate: error: Request for unknown model: 'portrait' is not found"
    for servers in (url, f"{dead},{url}"):  # the dead one is skipped over: the live one answers NOT_FOUND
        out = tmp_path / servers.replace(":", "_").replace(",", "+")
        argv = ["generate", "--user", "demo", "--num-images", "2", "--server", servers, "--out", str(out)]
        assert facetron(argv, monkeypatch) == 2
        assert _error_lines(capsys) == [expected]
        assert not out.exists()


def test_no_reachable_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    dead = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    argv = ["generate", "--user", "demo", "--server", ",".join(dead), "--retries", "2", "--out", str(tmp_path / "o")]
    assert facetron(argv, monkeypatch) == 2
    (line,) = _error_lines(capsys)
    assert line.startswith("facetron generate: error: no server could serve the call (4 tries over 2 servers)")
    assert all(d in line for d in dead)


@pytest.mark.triton
@pytest.mark.skipif(not PORTRAIT_LANDED, reason="the portrait model is not in model_repository/ yet")
def test_generate_end_to_end(
    triton: TritonServer, client, users_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from face_photos import photo, square_crop
    from facetron.imageio import save_image
    from facetron.faces.alignment import align_faces
    from facetron.users import UserRegistry

    registry = UserRegistry(users_dir)
    if not (registry.exists("demo") and (registry.files("demo") / "lora.safetensors").is_file()):
        # no trained "demo" user in this session: Tom Hanks' face + a random LoRA (tiny model)
        from facetron.diffusion.base_model import load_base_model
        from facetron.training.random_lora import write_random_lora

        tom = photo("tom_hanks")
        boxes, _, marks = client.detect(tom).image(0)
        registry.save_reference_embedding("demo", client.embed(align_faces(tom, marks[:1])))
        grant(registry, "demo")
        template = square_crop(tom, boxes[0], 0.6, 256)  # the face fused into each candidate
        save_image(tmp_path / "template.png", template)
        landmarks = client.detect(template).image(0)[2][0]
        (tmp_path / "template.json").write_text(json.dumps({"landmarks": landmarks.tolist()}))
        registry.update("demo", {"template.png": tmp_path / "template.png", "template.json": tmp_path / "template.json"})
        lora = write_random_lora(tmp_path / "demo.safetensors", load_base_model().unet, rank=4, alpha=4, seed=3, std=0.3)
        registry.install_lora("demo", lora)
    # template mode: the user's face is fused where the template photo has its face
    template = photo("astronaut")
    save_image(tmp_path / "template.png", template)
    # the tiny model's random VAE turns the template into noise: paste its pixels back outside the face
    # (seed 1: a seed whose fused face MTCNN finds again in the tiny model's noise, 4 of 40 seeds scanned here)
    result = client.portrait("demo", num_images=2, top_k=1, steps=2, seed=1, height=128, width=128, template=template,
                             strength=0.6, fusion_strength=0.8, paste_template=True)
    assert result.images.shape == (1, 128, 128, 3), "the fused template face survives selection"
    assert result.similarity.shape == result.rank.shape == result.similarity_generated.shape == (2,)
    assert result.similarity_final.shape == (2,) and result.ranked_by == result.report["ranked_by"]
    assert isinstance(result.report, dict) and result.timing["server"] == triton.grpc_url

    out = tmp_path / "gen"
    argv = ["generate", "--user", "demo", "--num-images", "2", "--top-k", "1", "--steps", "2", "--seed", "1",
            "--height", "128", "--width", "128", "--template", str(tmp_path / "template.png"), "--strength", "0.6", "--paste-template",
            "--fusion-strength", "0.8", "--server", triton.grpc_url, "--out", str(out)]
    assert facetron(argv, monkeypatch) == 0, capsys.readouterr().err
    doc = json.loads((out / "result.json").read_text())
    assert len(doc["candidates"]) == 2 and doc["servers_used"] == [triton.grpc_url]
    assert {"similarity", "similarity_generated", "similarity_final", "rank", "selected", "file"} <= set(doc["candidates"][0])
    assert doc["ranked_by"] in ("generated", "final") and doc["seed"] == 1
    assert doc["report"]["fusion"]["strength"] == pytest.approx(0.8)
    assert doc["files"] == ["portrait_00.png"] and doc["selected"] == result.selected.tolist()
    np.testing.assert_array_equal(load_image(out / "portrait_00.png"), result.images[0])  # same seed, same picture
    assert load_image(out / "grid.png").shape[2] == 3
    assert "client_total_s" in doc["client"] and isinstance(doc["report"], dict)
    assert not list(out.glob(".*.tmp")), "temp files left behind"
