"""The user registry: each change is one new version switched atomically;
readers never see a half-registered user; deleting removes every version."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from facetron.cli import main
from facetron.errors import InvalidInputError, NotFoundError
from facetron.users import CURRENT, LORA_FILE, UserRegistry


def _emb(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 128)).astype(np.float32)


def test_each_change_is_a_new_version_with_the_previous_files(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("facetron.users.VERSION_GRACE_S", -1.0)
    reg = UserRegistry(tmp_path)
    v1 = reg.save_reference_embedding("ann", _emb(1))
    (tmp_path / "l.safetensors").write_bytes(b"lora-1")
    v2 = reg.install_lora("ann", tmp_path / "l.safetensors")
    assert (v1, v2) == ("v000001", "v000002") and reg.version("ann") == v2
    files = reg.files("ann")
    assert sorted(p.name for p in files.iterdir()) == [LORA_FILE, "reference_embedding.npy"]
    np.testing.assert_allclose(reg.reference_embedding("ann"), _emb(1) / np.linalg.norm(_emb(1)), rtol=1e-6)
    (tmp_path / "l.safetensors").write_bytes(b"lora-2")
    reg.install_lora("ann", tmp_path / "l.safetensors")
    assert reg.lora_path("ann").read_bytes() == b"lora-2"
    versions = sorted(p.name for p in reg.user_dir("ann").iterdir() if p.name.startswith("v"))
    assert versions == ["v000002", "v000003"]  # the two newest are kept
    assert not [p for p in reg.user_dir("ann").iterdir() if p.name.startswith(".new-")]


def test_register_is_one_unit(tmp_path: Path) -> None:
    reg = UserRegistry(tmp_path)
    (tmp_path / "t.png").write_bytes(b"png")
    (tmp_path / "t.json").write_text(json.dumps({"landmarks": [[0, 0]] * 5}))
    v = reg.register("bob", _emb(2), tmp_path / "t.png", tmp_path / "t.json", {"subject": "a man", "trigger_token": "<b>"})
    assert v == "v000001" and reg.identity_text("bob") == ("<b>", "a man")
    assert sorted(reg.describe("bob")["files"]) == ["reference_embedding.npy", "template.json", "template.png", "user.json"]


def test_readers_never_see_a_half_written_user(tmp_path: Path) -> None:
    """While one thread installs new versions, readers always find all files of one version."""
    reg = UserRegistry(tmp_path)
    reg.update("cat", {"reference_embedding.npy": (tmp_path / "x").write_bytes(b"") or b"", "a": b"0", "b": b"0"})
    stop, bad = threading.Event(), []

    def read() -> None:
        while not stop.is_set():
            d = reg.files("cat")
            a, b = (d / "a").read_bytes(), (d / "b").read_bytes()
            if a != b:
                bad.append((a, b))

    readers = [threading.Thread(target=read) for _ in range(2)]
    for t in readers:
        t.start()
    for i in range(1, 60):
        reg.update("cat", {"a": str(i).encode(), "b": str(i).encode()})
    stop.set()
    for t in readers:
        t.join()
    assert bad == []


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    reg = UserRegistry(tmp_path)
    threads = [threading.Thread(target=reg.update, args=("dan", {f"f{i}": b"x"})) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(p.name for p in reg.files("dan").iterdir()) == [f"f{i}" for i in range(8)]
    assert reg.version("dan") == "v000008"


def test_delete_and_unknown_users(tmp_path: Path) -> None:
    reg = UserRegistry(tmp_path)
    reg.save_reference_embedding("eve", _emb(3))
    assert reg.users() == ["eve"] and reg.delete("eve")
    assert reg.users() == [] and not reg.delete("eve") and list(tmp_path.iterdir()) == []
    with pytest.raises(NotFoundError, match="unknown user 'eve'"):
        reg.reference_embedding("eve")
    with pytest.raises(InvalidInputError, match="not a valid user id"):
        reg.version("eve\n")
    assert (reg.user_dir("x") / CURRENT).name == CURRENT


def test_users_cli(tmp_path: Path, capsys) -> None:
    reg = UserRegistry(tmp_path)
    reg.save_reference_embedding("fay", _emb(4))
    assert main(["users", "list", "--users-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.split() == ["fay", "v000001", "lora=no"]
    assert main(["users", "show", "fay", "--users-dir", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == "v000001"
    assert main(["users", "delete", "fay", "--users-dir", str(tmp_path)]) == 0
    assert main(["users", "delete", "fay", "--users-dir", str(tmp_path)]) == 2
    assert "no user 'fay'" in capsys.readouterr().err
    assert main(["users", "show", "../x", "--users-dir", str(tmp_path)]) == 2
