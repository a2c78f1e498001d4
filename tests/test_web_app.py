"""The web app's endpoints driven over HTTP (gradio_client) against the real
test server: photos -> prepare -> train -> generate -> gallery and download,
with the progress each long step streams; and bad input (no photos,
non-images, unknown user, server down) answered with one clear message
while what was there stays."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import pytest

from web_fixtures import start_web, stop_web

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402


def _client(url: str, downloads: Path) -> Client:
    return Client(url, verbose=False, analytics_enabled=False, download_files=str(downloads))


@pytest.fixture(scope="module")
def web(triton, users_dir: Path, tmp_path_factory):
    """``facetron web`` (a subprocess) against the session's tritonserver."""
    root = tmp_path_factory.mktemp("web")
    proc, url = start_web(triton.grpc_url, users_dir, root / "work", root / "web.log")
    yield url, root
    stop_web(proc)


def _rows(df) -> list[list]:
    return df["data"] if isinstance(df, dict) else list(df)


@pytest.mark.triton
def test_photos_to_gallery_over_http(web, tmp_path: Path) -> None:
    from facetron.training.demo_photos import make_demo_photos

    url, root = web
    gc = _client(url, tmp_path / "downloads")
    photos = sorted(p for p in make_demo_photos(tmp_path / "photos").iterdir() if not p.name.startswith("."))
    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo")
    uploads = [handle_file(str(p)) for p in photos + [notes]]

    # 1-2. photos -> prepare report + contact sheet (the non-image is named and skipped)
    job = gc.submit("webflow", uploads, "gender=woman", api_name="/prepare")
    status, sheet, report = job.result(timeout=300)
    assert "Prepared **webflow**" in status and "skipped notes.txt" in status
    assert Path(sheet).is_file()
    rows = {r[0]: r for r in _rows(report)}
    assert rows["astronaut_01.png"][1] == "kept"
    assert any(r[1] == "dropped" and r[2] for r in rows.values())  # the stranger / no-face photos, with a reason
    n = len(photos)  # the readable ones
    assert f"progress {n}/{n} photos" in status, status  # parsed from `facetron train prepare`'s bar

    # 3. training with progress, parsed from `facetron train lora`'s own bar
    job = gc.submit("webflow", 4, api_name="/train")
    final = job.result(timeout=600)
    assert "Trained **webflow**" in final and "progress 4/4 steps" in final, final  # parsed from the CLI's bar

    # 4-5. style and options -> generation with per-step progress -> gallery, table, download
    from facetron.assets import asset_path

    template = handle_file(str(asset_path("photo_astronaut")))  # template mode: the tiny model makes no faces itself
    # fusion strength 1: the tiny model's face region is noise; only a full blend leaves a face that the server's
    # fresh detection of the returned picture finds again (at 0.5 the candidate is filtered, and the page says so)
    job = gc.submit("webflow", "studio", "", 1, 0, 2, 7.0, 11, "dpmsolver", template, 1.0, api_name="/generate")
    gallery, table, download, summary = job.result(timeout=300)
    # one report per denoising step over portrait_stream (template mode runs strength x steps of them)
    m = re.search(r"Denoising progress streamed: (\d+)/(\d+) steps", summary)
    assert m and m.group(1) == m.group(2) and int(m.group(2)) >= 1, summary
    assert len(gallery) == 1
    caption = gallery[0]["caption"]
    assert "similarity" in caption and "seed 11" in caption
    assert _rows(table)[0][:2] == [0, 11]
    with zipfile.ZipFile(download) as zf:
        names = set(zf.namelist())
        doc = json.loads(zf.read("result.json"))
    assert {"portrait_00.png", "result.json"} <= names
    assert doc["candidates"][0]["seed"] == 11 and doc["request"]["steps"] == 2
    assert doc["report"]["mode"] == "template"
    assert "portrait(s)" in summary


@pytest.mark.triton
def test_bad_input_is_one_clear_message_and_loses_nothing(web, tmp_path: Path) -> None:
    url, root = web
    gc = _client(url, tmp_path / "downloads")
    # a previous good upload of this user is on disk
    kept = root / "work" / "users" / "keepme" / "photos"
    kept.mkdir(parents=True)
    (kept / "earlier.png").write_bytes(b"earlier upload")

    with pytest.raises(AppError, match="no photos uploaded"):
        gc.predict("keepme", [], "", api_name="/prepare")
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\x00not a jpeg")
    with pytest.raises(AppError, match=r"junk\.jpg: is not a readable image"):
        gc.predict("keepme", [handle_file(str(junk))], "", api_name="/prepare")
    assert [p.name for p in kept.iterdir()] == ["earlier.png"]  # a refused upload replaces nothing
    with pytest.raises(AppError, match="user id: .*is not a valid user id"):
        gc.predict("../x", [handle_file(str(junk))], "", api_name="/prepare")
    with pytest.raises(AppError, match="attributes: 'gender' is not key=value"):
        gc.predict("keepme", [handle_file(str(junk))], "gender", api_name="/prepare")
    with pytest.raises(AppError, match="no prepared photos of 'keepme'"):
        gc.predict("keepme", 5, api_name="/train")
    with pytest.raises(AppError, match="Not found: .*nobody"):
        gc.predict("nobody", "studio", "", 1, 0, 2, 7.0, 1, "dpmsolver", None, 0.5, api_name="/generate")
    with pytest.raises(AppError, match="style: unknown style 'cubist'"):
        gc.predict("nobody", "cubist", "", 1, 0, 2, 7.0, 1, "dpmsolver", None, 0.5, api_name="/generate")
    with pytest.raises(AppError, match="less than minimum value 1"):  # the page's own range check
        gc.predict("nobody", "studio", "", 1, 0, 0, 7.0, 1, "dpmsolver", None, 0.5, api_name="/generate")
    with pytest.raises(AppError, match=r"top_k: must be in 0\.\.num_images \(1\), got 5"):  # the client's rule
        gc.predict("nobody", "studio", "", 1, 5, 2, 7.0, 1, "dpmsolver", None, 0.5, api_name="/generate")


def test_server_down_is_one_clear_message(tmp_path: Path) -> None:
    """No Triton at the configured address: the page says so; generating is refused clearly."""
    from facetron.triton.server import free_port
    from facetron.web.app import WebConfig, launch

    dead = f"127.0.0.1:{free_port()}"
    app = launch(WebConfig(server=dead, work_dir=tmp_path / "work", styles=("studio",)), port=free_port(), block=False)
    try:
        gc = _client(app.local_url, tmp_path / "downloads")
        assert f"Server {dead}: not reachable" in gc.predict(api_name="/status")
        with pytest.raises(AppError, match=f"The Triton server at {dead} did not answer"):
            gc.predict("astro", "studio", "", 1, 0, 2, 7.0, 1, "dpmsolver", None, 0.5, api_name="/generate")
    finally:
        app.close()
