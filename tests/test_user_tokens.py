"""Each caller acts only as its own user (issue 21): a per-user secret token,
issued by the registry (its SHA-256 kept there), checked by every served
model that reads a user; a missing or wrong token gets the same NOT_FOUND as
an unknown user. Over real gRPC against the session's tritonserver."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import numpy as np
import pytest
from user_tokens import grant

from facetron.contract import USER_TOKEN_HEADER
from facetron.errors import NotFoundError
from facetron.token_store import TokenStore
from facetron.users import TOKEN_FILE, UserRegistry

SIZE, STEPS = 64, 1


# --- the registry ----------------------------------------------------------------------


def _registered(root: Path, *users: str) -> UserRegistry:
    registry = UserRegistry(root)
    for user in users:
        registry.save_reference_embedding(user, np.ones((1, 128), np.float32))
    return registry


def test_registry_keeps_only_the_hash_and_checks_like_an_unknown_user(tmp_path: Path) -> None:
    _registered(tmp_path, "ann", "bob")
    served = UserRegistry(tmp_path, require_tokens=True)
    ann = served.issue_token("ann")
    bob = served.issue_token("bob")
    stored = (tmp_path / "ann" / TOKEN_FILE)
    assert stored.read_text().strip() == hashlib.sha256(ann.encode()).hexdigest()  # the hash, never the token
    assert ann not in stored.read_text() and stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert served.pin("ann", ann).user_id == "ann"
    answers = []
    for user, token in (("ann", bob), ("ann", None), ("ann", ""), ("nobody", ann)):
        with pytest.raises(NotFoundError) as err:
            served.pin(user, token)
        answers.append(str(err.value).replace("'nobody'", "'ann'"))
    assert len(set(answers)) == 1 and answers[0] == "user_id: unknown user 'ann'"
    # rotate: the old token stops at once; revoke: none works
    new = served.issue_token("ann")
    with pytest.raises(NotFoundError):
        served.pin("ann", ann)
    assert served.pin("ann", new).version
    assert served.revoke_token("ann") and not served.has_token("ann")
    with pytest.raises(NotFoundError):
        served.pin("ann", new)
    # an operator's registry (CLI, training) needs no token
    assert UserRegistry(tmp_path).pin("ann").user_id == "ann"


def test_issue_kept_issues_keeps_and_reuses_only_a_live_token(tmp_path: Path) -> None:
    """``token_store.issue_kept`` (registration, the benchmarks, the tests): the registry keeps the hash, the store
    the token; ``reuse`` returns the kept token while the registry has one, and issues anew after a revoke."""
    from facetron.token_store import issue_kept

    served = UserRegistry(_registered(tmp_path / "users", "ann").root, require_tokens=True)
    store = TokenStore(tmp_path / "tokens")
    token, path = issue_kept(served, "ann", store)
    assert path == store.path("ann") and store.get("ann") == token and served.pin("ann", token).user_id == "ann"
    assert issue_kept(served, "ann", store, reuse=True) == (token, path)
    other, _ = issue_kept(served, "ann", store)  # without reuse: a new one, the old one stops
    assert other != token and store.get("ann") == other
    with pytest.raises(NotFoundError):
        served.pin("ann", token)
    served.revoke_token("ann")
    fresh, _ = issue_kept(served, "ann", store, reuse=True)  # the kept one is dead: issued anew
    assert fresh != other and served.pin("ann", fresh).user_id == "ann"


def test_users_token_cli_issues_rotates_revokes(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    from facetron.cli import main

    monkeypatch.setenv("FACETRON_TOKENS_DIR", str(tmp_path / "tokens"))
    _registered(tmp_path / "users", "ann")
    served = UserRegistry(tmp_path / "users", require_tokens=True)
    assert main(["users", "token", "ann", "--users-dir", str(tmp_path / "users")]) == 0
    first = capsys.readouterr().out.strip()
    assert TokenStore().get("ann") == first and served.pin("ann", first)
    store_file = TokenStore().path("ann")
    assert stat.S_IMODE(store_file.stat().st_mode) == 0o600
    assert main(["users", "token", "ann", "--users-dir", str(tmp_path / "users")]) == 0
    assert "has a token" in capsys.readouterr().out  # not re-issued without --rotate
    assert main(["users", "token", "ann", "--rotate", "--users-dir", str(tmp_path / "users")]) == 0
    second = capsys.readouterr().out.strip()
    assert second != first and TokenStore().get("ann") == second
    with pytest.raises(NotFoundError):
        served.pin("ann", first)
    assert main(["users", "token", "ann", "--revoke", "--users-dir", str(tmp_path / "users")]) == 0
    assert TokenStore().get("ann") is None and not served.has_token("ann")
    assert main(["users", "token", "nobody", "--users-dir", str(tmp_path / "users")]) != 0


# --- over gRPC ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_users(users_dir: Path, tmp_path_factory) -> dict[str, str]:
    from facetron.diffusion.base_model import load_base_model
    from facetron.training.random_lora import write_random_lora

    work = tmp_path_factory.mktemp("token_users")
    registry = UserRegistry(users_dir)
    tokens = {}
    for seed, user in enumerate(("tok-ann", "tok-bob"), start=70):
        registry.save_reference_embedding(user, np.ones((1, 128), np.float32))
        registry.install_lora(user, write_random_lora(work / f"{user}.safetensors", load_base_model().unet, rank=4,
                                                      alpha=4, seed=seed, std=0.3))
        tokens[user] = grant(registry, user)
    return tokens


def _not_found(call) -> str:
    with pytest.raises(NotFoundError) as err:
        call()
    return str(err.value)


def _portrait(client, user: str, token: str | None):
    headers = {USER_TOKEN_HEADER: token} if token is not None else {}  # {} = no token at all
    inputs = {"user_id": np.array([user.encode()], dtype=object), "num_images": np.array([1], np.int32),
              "steps": np.array([STEPS], np.int32), "height": np.array([SIZE], np.int32),
              "width": np.array([SIZE], np.int32), "seed": np.array([1], np.int64)}
    return client.infer("portrait", inputs, ["report"], headers=headers)


def test_portrait_only_with_the_users_own_token(client, two_users, users_dir: Path) -> None:
    ann, bob = two_users["tok-ann"], two_users["tok-bob"]
    assert _portrait(client, "tok-ann", ann)["report"].size == 1  # A's token works
    wrong = _not_found(lambda: _portrait(client, "tok-ann", bob))
    missing = _not_found(lambda: _portrait(client, "tok-ann", None))
    unknown = _not_found(lambda: _portrait(client, "tok-nobody", ann))
    texts = {wrong, missing, unknown.replace("tok-nobody", "tok-ann")}
    assert len(texts) == 1, texts  # one answer: a stranger cannot tell which ids exist
    assert str(users_dir) not in wrong and "token" not in wrong.split("[status")[0]
    # the client's own call finds the token in the operator's store (grant kept it there)
    assert client.portrait("tok-ann", num_images=1, steps=STEPS, height=SIZE, width=SIZE, seed=1).images.shape[0] >= 0
    # revoked: the next request fails
    UserRegistry(users_dir).revoke_token("tok-ann")
    try:
        assert "unknown user 'tok-ann'" in _not_found(lambda: _portrait(client, "tok-ann", ann))
    finally:
        two_users["tok-ann"] = grant(users_dir, "tok-ann")


@pytest.mark.parametrize("model", ["unet", "text_encoder", "portrait_generator", "face_select"])
def test_every_model_that_reads_a_user_checks_the_token(client, two_users, model: str) -> None:
    """Called directly by a stranger, each door that reads a user answers like an unknown user."""
    user = np.array([[b"tok-bob"]], dtype=object)
    inputs = {
        "unet": {"sample": np.zeros((1, 4, 8, 8), np.float32), "timestep": np.ones((1, 1), np.float32),
                 "encoder_hidden_states": np.zeros((1, 77, 32), np.float32), "user_id": user},
        "text_encoder": {"input_ids": np.zeros((1, 77), np.int32), "user_id": user},
        "portrait_generator": {"user_id": user[0], "num_images": np.array([1], np.int32),
                               "steps": np.array([1], np.int32), "height": np.array([SIZE], np.int32),
                               "width": np.array([SIZE], np.int32)},
        "face_select": {"images": np.zeros((1, 64, 64, 3), np.uint8), "user_id": user[0]},
    }[model]
    outputs = {"unet": ["noise_pred"], "text_encoder": ["last_hidden_state"], "portrait_generator": ["images"],
               "face_select": ["similarity"]}[model]
    for headers in ({}, {USER_TOKEN_HEADER: two_users["tok-ann"]}):  # none, and another user's
        assert "unknown user 'tok-bob'" in _not_found(lambda: client.infer(model, inputs, outputs, headers=headers))
    out = client.infer(model, inputs, outputs, headers={USER_TOKEN_HEADER: two_users["tok-bob"]})
    assert set(out) == set(outputs)
