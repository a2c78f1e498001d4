"""`facetron users delete USER --purge`: every trace facetron made of a user is
gone from every facetron root (registries, web work folder, training outputs,
assembled repositories), and nothing facetron did not make is deleted.

The traces are built here the way facetron's writers lay them out (the
registry itself, atomic_dir's marked folders, a LoRA sidecar naming its file,
the web app's folders, a merged model's config + 1/facetron_merge.json); no
server and no training are needed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from facetron.atomic import atomic_dir
from facetron.cli import main
from facetron.contract import MERGE_INFO, VERSION_FOLDER, merged_unet_name
from facetron.token_store import TokenStore
from facetron.users import UserRegistry

USER = "zoe_purge7"  # distinctive: any path holding it is a trace
OTHER = "amy"


def _emb(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 128)).astype(np.float32)


def _lora(folder: Path, user: str, sidecar: bool = True) -> Path:
    """`train lora`'s outputs: <user>.safetensors + the sidecar naming it (the file's ownership marker)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{user}.safetensors").write_bytes(b"lora")
    if sidecar:
        (folder / f"{user}.json").write_text(json.dumps({"user_id": user, "lora_file": f"{user}.safetensors",
                                                         "facetron_version": "0.1.0"}))
    return folder / f"{user}.safetensors"


def _marked(path: Path, files: dict[str, str]) -> Path:
    with atomic_dir(path) as tmp:
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)
    return path


def _traces_of(user: str, home: Path) -> None:
    """Everything facetron's writers leave of ``user`` under the data root ``home``."""
    for i in range(3):  # three versions within the grace period: all kept by the registry
        UserRegistry(home / "users").update(user, {"reference_embedding.npy": _emb(i).tobytes(), "user.json": b"{}"})
    (home / "users" / f".deleted-{user}-ab12cd_x").mkdir()  # an interrupted delete
    UserRegistry(home / "demo" / "users").save_reference_embedding(user, _emb(9))
    _lora(home / "demo" / "loras", user)
    web = home / "web" / "users" / user
    (web / "photos").mkdir(parents=True)
    (web / "photos" / "me.jpg").write_bytes(b"raw photo")
    _marked(web / "prepared", {"reference_embedding.npy": "e", "dataset/metadata.jsonl": "{}", "template.png": "p"})
    _lora(web / "lora", user)
    (web / "lora" / "identity_selection.json").write_text("{}")
    run = home / "web" / "portraits" / user / "20250101-000000-000"
    run.mkdir(parents=True)
    (run / "result.json").write_text(json.dumps({"user_id": user}))
    (run / "portrait_00.png").write_bytes(b"png")
    (run / f"portraits-{user}-20250101-000000-000.zip").write_bytes(b"zip")
    _marked(home / "prepared" / user, {"report.json": "{}", "dataset/a.png": "a"})
    _lora(home / "loras", user)
    _marked(home / "loras" / f"{user}.ckpt", {"step-000005/state.json": "{}"})
    (home / "loras" / f"{user}.candidates").mkdir()  # an earlier run's, unmarked, only candidates: facetron's
    (home / "loras" / f"{user}.candidates" / "step-000010.safetensors").write_bytes(b"c")
    merged = home / "model_repository" / merged_unet_name(user)
    (merged / VERSION_FOLDER).mkdir(parents=True)
    (merged / "config.pbtxt").write_text(f'name: "{merged_unet_name(user)}"\n')
    (merged / VERSION_FOLDER / MERGE_INFO).write_text(json.dumps({"user_id": user}))
    TokenStore().put(user, UserRegistry(home / "users").issue_token(user))  # the operator's copy of its token


def _naming(root: Path, user: str) -> list[Path]:
    """Every path under ``root`` holding ``user`` in its path or, for a small text file, in its text."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            small_text = path.is_file() and path.stat().st_size < 65536
            if user in str(path.relative_to(root)) or (small_text and user.encode() in path.read_bytes()):
                found.append(path)
    return sorted(found)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("FACETRON_HOME", str(home))
    monkeypatch.delenv("FACETRON_USERS_DIR", raising=False)
    monkeypatch.delenv("FACETRON_BUILD_DIR", raising=False)
    return home


def test_purge_leaves_nothing_of_the_user_and_keeps_what_is_foreign(home: Path, capsys) -> None:
    _traces_of(USER, home)
    _traces_of(OTHER, home)
    foreign_lora = home / "loras" / f"{USER}.notes.txt"  # named after the user, not made by facetron
    foreign_lora.write_text("my own notes")
    foreign_model = home / "demo" / "model_repository" / merged_unet_name(USER)  # no marker, no merge record
    foreign_model.mkdir(parents=True)
    (foreign_model / "README").write_text("hand-made")
    other_before = _naming(home, OTHER)
    assert len(_naming(home, USER)) > 30

    assert main(["users", "delete", USER, "--purge"]) == 0
    out = capsys.readouterr().out.splitlines()
    removed = {Path(line.split(" ", 1)[1]) for line in out if line.startswith("removed ")}
    assert {home / "users" / USER, home / "users" / f".deleted-{USER}-ab12cd_x", home / "demo" / "users" / USER,
            home / "web" / "users" / USER, home / "web" / "portraits" / USER, home / "prepared" / USER,
            home / "loras" / f"{USER}.safetensors", home / "loras" / f"{USER}.json", home / "loras" / f"{USER}.ckpt",
            home / "loras" / f"{USER}.candidates", home / "model_repository" / merged_unet_name(USER)} <= removed
    assert all(not p.exists() for p in removed)
    kept = [line for line in out if line.startswith("kept ")]
    assert len(kept) == 2 and any(str(foreign_lora) in k for k in kept) and any(str(foreign_model) in k for k in kept)
    assert home / "tokens" / USER in removed and not (home / "users" / USER / "token.sha256").exists()

    assert _naming(home, USER) == sorted([foreign_lora, foreign_model, foreign_model / "README"])  # only foreign
    assert foreign_lora.read_text() == "my own notes" and (foreign_model / "README").read_text() == "hand-made"
    assert _naming(home, OTHER) == other_before  # another user's traces untouched
    assert UserRegistry(home / "users").exists(OTHER)


def test_purge_never_removes_an_unmarked_folder_or_a_lora_without_its_sidecar(home: Path, tmp_path: Path,
                                                                             capsys) -> None:
    UserRegistry(home / "users").save_reference_embedding(USER, _emb(1))
    (home / "prepared" / USER).mkdir(parents=True)
    (home / "prepared" / USER / "mine.txt").write_text("not facetron's")
    _lora(home / "loras", USER, sidecar=False)
    web = tmp_path / "elsewhere-web"
    (web / "users" / USER / "photos").mkdir(parents=True)
    (web / "users" / USER / "diary.txt").write_text("foreign")
    assert main(["users", "delete", USER, "--purge", "--web-work", str(web)]) == 0
    out = capsys.readouterr().out
    assert f"removed {home / 'users' / USER}\n" in out and f"removed {web / 'users' / USER / 'photos'}\n" in out
    for path in (home / "prepared" / USER / "mine.txt", home / "loras" / f"{USER}.safetensors",
                 web / "users" / USER / "diary.txt"):
        assert path.is_file() and f"kept    {path if path.name != 'mine.txt' else path.parent}" in out
    assert main(["users", "delete", "nobody", "--purge"]) == 2  # no trace anywhere: NOT_FOUND as before


def test_delete_without_purge_says_what_is_left_and_how_to_purge(home: Path, capsys) -> None:
    _traces_of(USER, home)
    assert main(["users", "delete", USER]) == 0
    out = capsys.readouterr().out
    assert f"deleted user {USER!r}" in out and f"facetron users delete {USER} --purge" in out
    assert f"  {home / 'web' / 'users' / USER}\n" in out and f"  {home / 'loras' / f'{USER}.safetensors'}\n" in out
    assert not (home / "users" / USER).exists() and (home / "web" / "users" / USER / "photos" / "me.jpg").is_file()
