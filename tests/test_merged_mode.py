"""Serving mode 1 (merged): a user's merged UNet added to an assembled
repository without rebuilding the rest, loaded on the user's first request by
a server in explicit model-control mode; its portraits equal the runtime-LoRA
mode's (the session server) within tolerance."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from facetron.errors import NotFoundError
from facetron.export.model_configs import models_for
from facetron.users import UserRegistry
from user_tokens import grant  # noqa: E402

pytestmark = pytest.mark.triton

REQUEST = {"num_images": np.array([1], np.int32), "steps": np.array([3], np.int32), "seed": np.array([21], np.int64)}


@pytest.fixture(scope="module")
def merged_server(tmp_path_factory, users_dir: Path):
    from facetron.diffusion.base_model import load_base_model
    from facetron.training.random_lora import write_random_lora
    from facetron.export.diffusion_source import DiffusionSource
    from facetron.export.repository import add_merged_user, assemble_repository
    from facetron.triton.server import TritonServer

    registry = UserRegistry(users_dir)
    registry.save_reference_embedding("merged-user", np.ones((1, 128), np.float32))
    grant(registry, "merged-user")
    work = tmp_path_factory.mktemp("merged")
    lora = write_random_lora(work / "m.safetensors", load_base_model().unet, rank=4, alpha=4, seed=33, std=0.3)
    registry.install_lora("merged-user", lora)
    repo = assemble_repository("cpu", work / "repo", diffusion=DiffusionSource(), users_dir=users_dir,
                               identity_mode="merged")
    added = add_merged_user(repo, "merged-user", users_dir)
    # a user whose LoRA has text-encoder layers: the UNet part fused, the text side the runtime-LoRA text_encoder
    base = load_base_model()
    registry.save_reference_embedding("merged-te-user", np.ones((1, 128), np.float32))
    grant(registry, "merged-te-user")
    registry.install_lora("merged-te-user", write_random_lora(work / "te.safetensors", base.unet, rank=4, alpha=8,
                                                              seed=34, std=0.1, text_encoder=base.text_encoder,
                                                              te_rank=4, te_alpha=4))
    add_merged_user(repo, "merged-te-user", users_dir)
    for i in range(3):  # three more merged users for the LRU test
        user = f"merged-lru-{i}"
        registry.save_reference_embedding(user, np.ones((1, 128), np.float32))
        grant(registry, user)
        registry.install_lora(user, write_random_lora(work / f"{user}.safetensors", load_base_model().unet, rank=4,
                                                      alpha=4, seed=40 + i, std=0.3))
        add_merged_user(repo, user, users_dir)
    cfg = repo / "portrait_generator" / "config.pbtxt"  # one merged UNet per generator instance (2 instances)
    cfg.write_text(re.sub(r'(key: "max_merged_models"\s*value \{\s*string_value: )"\d+"', r'\1"1"', cfg.read_text()))
    assert 'string_value: "1"' in cfg.read_text()
    names = [m.name for m in models_for("cpu", diffusion=True)]
    server = TritonServer(repo, log_path=work / "log.txt", model_control_mode="explicit", load_models=names)
    server.start()
    yield server, added
    server.stop()


def test_merged_user_is_loaded_on_first_use_and_matches_runtime_lora(merged_server, client) -> None:
    from facetron.client import FacetronClient

    server, added = merged_server
    assert (added / "1" / "model.onnx").is_file() and (added / "config.pbtxt").is_file()
    user = {"user_id": np.array([b"merged-user"], dtype=object)}
    with FacetronClient(server.grpc_url, timeout_s=300) as merged_client:
        assert not merged_client.model_ready("unet_user_merged-user")
        merged = merged_client.infer("portrait_generator", {**REQUEST, **user}, ["images"])["images"]
        assert merged_client.model_ready("unet_user_merged-user")
    runtime = client.infer("portrait_generator", {**REQUEST, **user}, ["images"])["images"]  # session server: mode 2
    assert np.abs(merged.astype(int) - runtime.astype(int)).max() <= 2


def test_merged_user_with_a_text_encoder_lora_matches_runtime_lora(merged_server, client) -> None:
    """Merged mode serves a text-encoder LoRA (the runtime-LoRA text_encoder, user_id
    sent in merged mode too) equal to runtime mode (equal to diffusers' load_lora_weights:
    tests/test_diffusers_parity.py)."""
    import json

    from facetron.client import FacetronClient

    server, added = merged_server
    info = json.loads((added.parent / "unet_user_merged-te-user" / "1" / "facetron_merge.json").read_text())
    assert "runtime-LoRA text_encoder" in info["text_encoder"]
    user = {"user_id": np.array([b"merged-te-user"], dtype=object)}
    with FacetronClient(server.grpc_url, timeout_s=300) as merged_client:
        merged = merged_client.infer("portrait_generator", {**REQUEST, **user}, ["images"])["images"]
    runtime = client.infer("portrait_generator", {**REQUEST, **user}, ["images"])["images"]  # session server: mode 2
    assert np.abs(merged.astype(int) - runtime.astype(int)).max() <= 2


def test_merged_mode_refuses_step_caching_by_name(merged_server) -> None:
    """Merged per-user UNets have no step-cache graphs: cache_interval > 1 is INVALID_ARGUMENT naming it."""
    from facetron.client import FacetronClient
    from facetron.errors import InvalidInputError

    server, _ = merged_server
    request = {**REQUEST, "user_id": np.array([b"merged-user"], dtype=object),
               "cache_interval": np.array([2], np.int32)}
    with FacetronClient(server.grpc_url, timeout_s=300) as c, pytest.raises(
            InvalidInputError, match="cache_interval: step caching is served by the runtime-LoRA unet"):
        c.infer("portrait_generator", request, ["images"])


@pytest.mark.slow  # ~50 s (four merged UNet loads; the ledger's order: the next test, in-process): make test-all
def test_merged_models_are_unloaded_least_recently_used_first(merged_server) -> None:
    """max_merged_models=1 on a server whose portrait_generator has 2 instances: one LRU for
    the whole server (the launcher's ledger), so after three users in turn and the first again
    only the first's merged UNet is loaded, and every user was served."""
    from facetron.client import FacetronClient

    server, _ = merged_server
    users = [f"merged-lru-{i}" for i in range(3)]
    with FacetronClient(server.grpc_url, timeout_s=300) as c:
        for user in users + users[:1]:
            c.infer("portrait_generator", {**REQUEST, "user_id": np.array([user.encode()], dtype=object)}, ["images"])
        loaded = [u for u in users + ["merged-user", "merged-te-user"] if c.model_ready(f"unet_user_{u}")]
    assert loaded == ["merged-lru-0"], loaded


def test_the_merged_lru_ledger_is_one_order_for_every_process(tmp_path: Path) -> None:
    """Two processes' MergedModels over one ledger: a use in either counts for both."""
    from facetron.triton.bls import MergedModels

    ledger = tmp_path / "merged-lru.json"
    a, b = MergedModels(2, ledger), MergedModels(2, ledger)
    assert a._record_use("unet_user_x") == [] and b._record_use("unet_user_y") == []
    assert a._record_use("unet_user_x") == []  # x used again: y is now the oldest
    assert b._record_use("unet_user_z") == ["unet_user_y"]  # b evicts what a never loaded itself
    assert sorted(json.loads(ledger.read_text())) == ["unet_user_x", "unet_user_z"]
    ledger.write_text("{torn")  # a writer killed mid-write: the next use starts a fresh order
    assert a._record_use("unet_user_x") == [] and json.loads(ledger.read_text()).keys() == {"unet_user_x"}


def test_a_user_re_added_while_loaded_is_served_the_new_weights(merged_server, client, users_dir: Path,
                                                                tmp_path: Path) -> None:
    """Merged mode: `export add-user` rewriting ``unet_user_<id>`` while the old one is loaded
    reloads it on the next request: same seed, new images, equal to the runtime-LoRA mode's
    (the session server, which reads the same registry) with the new LoRA."""
    from facetron.client import FacetronClient
    from facetron.diffusion.base_model import load_base_model
    from facetron.export.repository import add_merged_user
    from facetron.training.random_lora import write_random_lora

    server, added = merged_server
    repo, user = added.parent, "merged-readd"
    request = {**REQUEST, "user_id": np.array([user.encode()], dtype=object)}
    registry = UserRegistry(users_dir)
    registry.save_reference_embedding(user, np.ones((1, 128), np.float32))
    grant(registry, user)
    base_unet = load_base_model().unet

    def retrain_and_add(seed: int) -> np.ndarray:
        registry.install_lora(user, write_random_lora(tmp_path / f"{seed}.safetensors", base_unet, rank=4, alpha=4,
                                                      seed=seed, std=0.3))
        add_merged_user(repo, user, users_dir)
        return client.infer("portrait_generator", request, ["images"])["images"]  # session server: mode 2

    with FacetronClient(server.grpc_url, timeout_s=300) as c:
        runtime_old = retrain_and_add(51)
        old = c.infer("portrait_generator", request, ["images"])["images"]
        assert c.model_ready(f"unet_user_{user}")
        runtime_new = retrain_and_add(52)  # rewrites unet_user_merged-readd while the old one is loaded
        assert c.model_ready(f"unet_user_{user}")
        new = c.infer("portrait_generator", request, ["images"])["images"]
        again = c.infer("portrait_generator", request, ["images"])["images"]  # the other instance, or no reload
    diff = {pair: int(np.abs(a.astype(int) - b.astype(int)).max()) for pair, (a, b) in {
        "old-runtime_old": (old, runtime_old), "new-old": (new, old), "new-runtime_new": (new, runtime_new),
        "again-new": (again, new)}.items()}
    print(f"re-add max |diff|: {diff}")
    assert diff["old-runtime_old"] <= 2
    assert diff["new-old"] > 20  # the new LoRA shows
    assert diff["new-runtime_new"] <= 2 and diff["again-new"] <= 2


def test_a_retrained_user_is_not_served_from_a_stale_merge(merged_server, users_dir: Path, tmp_path: Path) -> None:
    """Merged mode: after a retrain the old merge would show the old identity: NOT_FOUND, named, until add-user."""
    from facetron.client import FacetronClient
    from facetron.diffusion.base_model import load_base_model
    from facetron.training.random_lora import write_random_lora

    server, _ = merged_server
    user = "merged-lru-2"
    registry = UserRegistry(users_dir)
    registry.install_lora(user, write_random_lora(tmp_path / "new.safetensors", load_base_model().unet, rank=4,
                                                  alpha=4, seed=77, std=0.3))
    with FacetronClient(server.grpc_url, timeout_s=120) as c, pytest.raises(NotFoundError, match="built from its version"):
        c.infer("portrait_generator", {**REQUEST, "user_id": np.array([user.encode()], dtype=object)}, ["images"])


def test_merged_mode_unknown_merge_is_not_found(merged_server, users_dir: Path) -> None:
    """A registered user without a merged UNet in the repository: NOT_FOUND, named."""
    from facetron.client import FacetronClient

    UserRegistry(users_dir).save_reference_embedding("astro-nomerge", np.ones((1, 128), np.float32))
    grant(UserRegistry(users_dir), "astro-nomerge")

    server, _ = merged_server
    with FacetronClient(server.grpc_url, timeout_s=120) as c, pytest.raises(NotFoundError, match="no merged UNet"):
        c.infer("portrait_generator", {**REQUEST, "user_id": np.array([b"astro-nomerge"], dtype=object)}, ["images"])


def test_add_user_needs_a_lora(tmp_path: Path, users_dir: Path, full_repository: Path) -> None:
    from facetron.export.repository import add_merged_user

    with pytest.raises(NotFoundError, match="no trained LoRA"):
        add_merged_user(full_repository, "nobody-here", users_dir)
