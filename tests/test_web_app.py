"""The web app's endpoints driven over HTTP (gradio_client) against the real
test server: photos -> prepare -> train -> generate -> gallery and download,
with the progress each long step streams; and bad input (no photos,
non-images, unknown user, server down) answered with one clear message
while what was there stays. Every client logs in; a session acts only as
its own user; the bounds of facetron.web.limits refuse with one message."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import pytest

from web_fixtures import start_web, stop_web, write_logins

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402


LOGINS = {"webflow": "webflow-password", "keepme": "keepme-password"}


def _client(url: str, downloads: Path, user: str | None = None) -> Client:
    auth = (user, LOGINS[user]) if user else None
    return Client(url, verbose=False, analytics_enabled=False, download_files=str(downloads), auth=auth)


@pytest.fixture(scope="module")
def web(triton, users_dir: Path, tmp_path_factory):
    """``facetron web`` (a subprocess) against the session's tritonserver, behind two logins."""
    root = tmp_path_factory.mktemp("web")
    logins = write_logins(root / "logins", LOGINS)
    proc, url = start_web(triton.grpc_url, users_dir, root / "work", root / "web.log", credentials=logins)
    yield url, root
    stop_web(proc)


def _rows(df) -> list[list]:
    return df["data"] if isinstance(df, dict) else list(df)


@pytest.mark.triton
def test_photos_to_gallery_over_http(web, tmp_path: Path) -> None:
    from facetron.training.demo_photos import make_demo_photos

    url, root = web
    gc = _client(url, tmp_path / "downloads", "webflow")
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
    # seed 7: one whose fused face the detector finds again in the tiny model's noise (7 of 24 seeds scanned here)
    job = gc.submit("webflow", "studio", "", 1, 0, 2, 7.0, 7, "dpmsolver", template, 1.0, api_name="/generate")
    gallery, table, download, summary = job.result(timeout=300)
    # one report per denoising step over portrait_stream (template mode runs strength x steps of them)
    m = re.search(r"Denoising progress streamed: (\d+)/(\d+) steps", summary)
    assert m and m.group(1) == m.group(2) and int(m.group(2)) >= 1, summary
    assert len(gallery) == 1
    caption = gallery[0]["caption"]
    assert "similarity" in caption and "seed 7" in caption
    assert _rows(table)[0][:2] == [0, 7]
    with zipfile.ZipFile(download) as zf:
        names = set(zf.namelist())
        doc = json.loads(zf.read("result.json"))
    assert {"portrait_00.png", "result.json"} <= names
    assert doc["candidates"][0]["seed"] == 7 and doc["request"]["steps"] == 2
    assert doc["report"]["mode"] == "template"
    assert "portrait(s)" in summary


@pytest.mark.triton
def test_bad_input_is_one_clear_message_and_loses_nothing(web, tmp_path: Path) -> None:
    url, root = web
    gc = _client(url, tmp_path / "downloads", "keepme")
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
    with pytest.raises(AppError, match="user id: this session is logged in as 'keepme' .* not '../x'"):
        gc.predict("../x", [handle_file(str(junk))], "", api_name="/prepare")
    with pytest.raises(AppError, match="attributes: 'gender' is not key=value"):
        gc.predict("keepme", [handle_file(str(junk))], "gender", api_name="/prepare")
    with pytest.raises(AppError, match="no prepared photos of 'keepme'"):
        gc.predict("keepme", 5, api_name="/train")
    with pytest.raises(AppError, match="Not found: .*keepme"):  # logged in, but never prepared or trained
        gc.predict("keepme", "studio", "", 1, 0, 2, 7.0, 1, "dpmsolver", None, 0.5, api_name="/generate")
    with pytest.raises(AppError, match="style: unknown style 'cubist'"):
        gc.predict("", "cubist", "", 1, 0, 2, 7.0, 1, "dpmsolver", None, 0.5, api_name="/generate")
    with pytest.raises(AppError, match="less than minimum value 1"):  # the page's own range check
        gc.predict("keepme", "studio", "", 1, 0, 0, 7.0, 1, "dpmsolver", None, 0.5, api_name="/generate")
    with pytest.raises(AppError, match=r"top_k: must be in 0\.\.num_images \(1\), got 5"):  # the client's rule
        gc.predict("keepme", "studio", "", 1, 5, 2, 7.0, 1, "dpmsolver", None, 0.5, api_name="/generate")
    # another user's identity is out of reach: webflow is registered (the test above), keepme may not use it
    with pytest.raises(AppError, match="logged in as 'keepme' and acts only as that user, not 'webflow'"):
        gc.predict("webflow", "studio", "", 1, 0, 2, 7.0, 1, "dpmsolver", None, 0.5, api_name="/generate")


def test_server_down_is_one_clear_message(tmp_path: Path) -> None:
    """No Triton at the configured address: the page says so; generating is refused clearly."""
    from facetron.triton.server import free_port
    from facetron.web.app import WebConfig, close, launch

    dead = f"127.0.0.1:{free_port()}"
    config = WebConfig(server=dead, work_dir=tmp_path / "work", styles=("studio",), login=False)
    app = launch(config, port=free_port(), block=False)
    try:
        gc = _client(app.local_url, tmp_path / "downloads")
        assert f"Server {dead}: not reachable" in gc.predict(api_name="/status")
        with pytest.raises(AppError, match=f"The Triton server at {dead} did not answer"):
            gc.predict("astro", "studio", "", 1, 0, 2, 7.0, 1, "dpmsolver", None, 0.5, api_name="/generate")
    finally:
        close(app)


# --- login, sessions bound to their user, nothing served by path, bounds (no Triton needed) ---------------


@pytest.fixture(scope="module")
def locked(tmp_path_factory):
    """The page in this process behind two logins (a dead Triton address: nothing here reaches it), with a
    photo of each user staged where prepare puts uploads."""
    from PIL import Image

    from facetron.triton.server import free_port
    from facetron.web.app import WebConfig, close, launch
    from facetron.web.auth import Authenticator, load_credentials
    from facetron.web.photos import stage_photos

    root = tmp_path_factory.mktemp("web_locked")
    config = WebConfig(server=f"127.0.0.1:{free_port()}", work_dir=root / "work", styles=("studio",))
    staged = {}
    for user in LOGINS:
        src = root / f"{user}.png"
        Image.new("RGB", (64, 64), (200, 120, 90)).save(src)
        staged[user] = stage_photos([src], config.user_dir(user) / "photos") / src.name
    auth = Authenticator(load_credentials(write_logins(root / "logins", LOGINS)))
    app = launch(config, port=free_port(), block=False, auth=auth)
    yield app.local_url, staged, root
    close(app)


def _login(url: str, user: str, password: str):
    import requests

    s = requests.Session()
    r = s.post(url + "login", data={"username": user, "password": password}, timeout=30)
    return s, r


def test_a_visitor_who_is_not_logged_in_gets_nothing(locked) -> None:
    import requests

    url, staged, _ = locked
    for method, path in (("get", "gradio_api/info"), ("get", "config"), ("post", "gradio_api/call/prepare"),
                         ("post", "gradio_api/queue/join"), ("post", "gradio_api/upload"),
                         ("get", f"gradio_api/file={staged['webflow']}")):
        r = getattr(requests, method)(url + path, timeout=30)
        assert r.status_code == 401, (path, r.status_code, r.text[:200])
    with pytest.raises(Exception):
        Client(url, verbose=False, analytics_enabled=False)  # no login: not even the API description
    s, r = _login(url, "webflow", "wrong password")
    assert r.status_code == 400 and s.get(url + "config", timeout=30).status_code == 401
    s, r = _login(url, "nobody", LOGINS["webflow"])
    assert r.status_code == 400


def test_a_logged_in_user_fetches_no_file_of_the_work_folder_by_path(locked) -> None:
    url, staged, root = locked
    s, r = _login(url, "keepme", LOGINS["keepme"])
    assert r.status_code == 200 and s.get(url + "config", timeout=30).status_code == 200
    for path in (staged["webflow"], staged["keepme"], root / "logins"):  # another's photo, even one's own
        assert path.is_file()
        r = s.get(url + f"gradio_api/file={path}", timeout=30)
        assert r.status_code == 403 and r.content != path.read_bytes(), (path, r.status_code)


def test_a_session_acts_only_as_its_own_user(locked, tmp_path: Path) -> None:
    url, staged, _ = locked
    gc = _client(url, tmp_path / "downloads", "keepme")
    assert gc.predict(api_name="/whoami") == "keepme"  # the user-id field: the login, read-only
    photo = handle_file(str(staged["keepme"]))
    refused = "user id: this session is logged in as 'keepme' and acts only as that user, not 'webflow'"
    with pytest.raises(AppError, match=refused):
        gc.predict("webflow", [photo], "", api_name="/prepare")
    with pytest.raises(AppError, match=refused):
        gc.predict("webflow", 5, api_name="/train")
    with pytest.raises(AppError, match=refused):
        gc.predict("webflow", "studio", "", 1, 0, 2, 7.0, 1, "dpmsolver", None, 0.5, api_name="/generate")
    before = sorted(p.name for p in staged["webflow"].parent.iterdir())
    assert before == [staged["webflow"].name]  # webflow's upload untouched


def test_uploads_steps_and_queue_are_bounded(locked, tmp_path: Path) -> None:
    from PIL import Image

    from facetron.errors import InvalidInputError
    from facetron.web import limits, photos

    url, staged, _ = locked
    gc = _client(url, tmp_path / "downloads", "keepme")
    many = [handle_file(str(staged["keepme"]))] * (limits.MAX_UPLOAD_FILES + 1)
    with pytest.raises(AppError, match=f"photos: {limits.MAX_UPLOAD_FILES + 1} files uploaded; at most "
                                       f"{limits.MAX_UPLOAD_FILES} per prepare"):
        gc.predict("keepme", many, "", api_name="/prepare")
    bomb = tmp_path / "bomb.png"  # 25 MP of one colour: a small file, a large image
    Image.new("L", (5000, 5000)).save(bomb, optimize=False, compress_level=1)
    assert bomb.stat().st_size < limits.MAX_UPLOAD_FILE_BYTES
    with pytest.raises(AppError, match=r"bomb\.png: is 5000x5000 = 25\.0 MP; at most 24 MP per image"):
        gc.predict("keepme", [handle_file(str(bomb))], "", api_name="/prepare")
    with pytest.raises(AppError, match=r"template photo: is 5000x5000 = 25\.0 MP"):  # checked before decoding
        gc.predict("", "studio", "", 1, 0, 2, 7.0, 1, "dpmsolver", handle_file(str(bomb)), 0.5, api_name="/generate")
    with pytest.raises(AppError, match=f"greater than maximum value {limits.MAX_TRAIN_STEPS}"):
        gc.predict("keepme", limits.MAX_TRAIN_STEPS + 1, api_name="/train")
    big = tmp_path / "big.png"
    with open(big, "wb") as f:
        f.truncate(limits.MAX_UPLOAD_FILE_BYTES + 1)
    with pytest.raises(Exception, match="(?i)size|large"):  # Gradio refuses it while receiving it
        gc.predict("keepme", [handle_file(str(big))], "", api_name="/prepare")
    # bytes in total (sparse files: sizes without writing the bytes)
    parts = []
    for i in range(limits.MAX_UPLOAD_TOTAL_BYTES // limits.MAX_UPLOAD_FILE_BYTES + 1):
        parts.append(tmp_path / f"part{i}.png")
        with open(parts[-1], "wb") as f:
            f.truncate(limits.MAX_UPLOAD_FILE_BYTES)
    with pytest.raises(InvalidInputError, match="MB together; at most 200 MB per prepare"):
        photos.check_uploads(parts)
    config = json.loads(_login(url, "keepme", LOGINS["keepme"])[0].get(url + "config", timeout=30).text)
    assert config.get("max_file_size") == limits.MAX_UPLOAD_FILE_BYTES


def test_the_page_refuses_to_start_exposed(tmp_path: Path) -> None:
    from facetron.errors import InvalidInputError
    from facetron.web.app import WebConfig, check_launch

    with pytest.raises(InvalidInputError, match="--credentials: no logins configured"):
        check_launch(WebConfig(server="127.0.0.1:1", work_dir=tmp_path), "127.0.0.1", None)
    with pytest.raises(InvalidInputError, match="--no-login: serves loopback only"):
        check_launch(WebConfig(server="127.0.0.1:1", work_dir=tmp_path, login=False), "0.0.0.0", None)
    with pytest.raises(InvalidInputError, match="--work: .* overlaps Gradio's cache folder"):
        import gradio

        check_launch(WebConfig(server="127.0.0.1:1", work_dir=Path(gradio.utils.get_upload_folder()) / "w"),
                     "127.0.0.1", lambda u, p: False)


def test_logins_are_salted_hashes_and_a_bad_file_is_refused(tmp_path: Path) -> None:
    from facetron.errors import InvalidInputError
    from facetron.web.auth import MAX_FAILED_LOGINS, Authenticator, load_credentials, set_login

    path = set_login(tmp_path / "logins", "alice", "correct horse")
    set_login(path, "bob", "correct horse")
    text = path.read_text()
    assert "correct horse" not in text and (path.stat().st_mode & 0o077) == 0
    logins = load_credentials(path)
    assert logins["alice"] != logins["bob"]  # same password, different salt
    now = [0.0]
    auth = Authenticator(logins, clock=lambda: now[0])
    assert auth("alice", "correct horse") and not auth("alice", "wrong") and not auth("carol", "correct horse")
    for _ in range(MAX_FAILED_LOGINS):
        auth("bob", "guess")
    assert not auth("bob", "correct horse")  # throttled, even with the right password
    now[0] += 61
    assert auth("bob", "correct horse")
    (tmp_path / "plain").write_text("alice:hunter22\n")
    with pytest.raises(InvalidInputError, match="line 1: is not 'user_id:scrypt"):
        load_credentials(tmp_path / "plain")
    with pytest.raises(InvalidInputError, match="at least 8"):
        set_login(path, "carol", "short")


def test_training_stages_end_with_their_page_and_with_the_app(tmp_path: Path) -> None:
    """A stage (a real long-running `facetron` child: `facetron web --no-login`) runs in its own process
    group; cancelling it (the page went away) or stop_all (the app closes) ends the group."""
    import os
    import threading
    import time

    from facetron.triton.server import free_port
    from facetron.web import stages

    def start(cancel=None):
        out = {}

        def target():
            try:
                stages.run_stage(["web", "--no-login", "--port", str(free_port()), "--work", str(tmp_path / "w")],
                                 cancel=cancel)
            except stages.StageError as exc:
                out["error"] = str(exc)
        t = threading.Thread(target=target)
        t.start()
        deadline = time.monotonic() + 10
        while not stages.live_stages() and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = stages.live_stages()
        assert len(pids) == 1 and os.getpgid(pids[0]) == pids[0]  # its own process group
        return t, out, pids[0]

    cancel = threading.Event()
    t, out, pid = start(cancel)
    cancel.set()
    t.join(30)
    assert "was stopped" in out["error"] and not stages.live_stages()
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    t, out, pid = start()
    assert stages.stop_all() == 1
    t.join(30)
    assert "error" in out and not stages.live_stages()
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
