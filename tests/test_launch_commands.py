"""Triton's non-inference APIs are behind the admin key in every launch mode
and container (issue 21): the launch command of each is parsed, and one real
server refuses a statistics / shared-memory request without the key."""

from __future__ import annotations

import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from facetron.paths import REPO_ROOT
from facetron.triton import server as launcher
from facetron.triton.server import (
    ADMIN_HEADER,
    GRPC_ADMIN_HEADER,
    RESTRICTED_APIS,
    SHM_DIR,
    TritonServer,
    find_triton,
    hold_shm_lock,
    regions,
    remove_orphaned_regions,
)

DEPLOY = REPO_ROOT / "deploy"
KEY = "k" * 32
FLAGS = ("--grpc-restricted-protocol", "--http-restricted-api")


def restricted(command: list[str], key: str = KEY) -> dict[str, set[str]]:
    """flag -> the APIs it restricts behind ``ADMIN_HEADER=key``."""
    out: dict[str, set[str]] = {}
    for arg in command:
        name, _, value = arg.partition("=")
        if name in FLAGS:
            apis, _, header = value.partition(":")
            assert header == f"{ADMIN_HEADER}={key}", arg
            out.setdefault(name, set()).update(apis.split(","))
    return out


def assert_all_restricted(command: list[str], key: str = KEY) -> None:
    got = restricted(command, key)
    for flag in FLAGS:
        assert set(RESTRICTED_APIS) <= got.get(flag, set()), f"{flag}: {sorted(got.get(flag, set()))}"
    assert not {"inference", "health", "metadata"} & set().union(*got.values()), "inference stays open"


def test_restricted_apis_are_every_non_inference_protocol() -> None:
    """Triton 2.51's own list (tritonserver --help) less health, metadata, inference."""
    install = find_triton()
    env = dict(os.environ, LD_LIBRARY_PATH=str(install.lib_dir))
    text = subprocess.run([str(install.binary), "--help"], capture_output=True, text=True, env=env)
    text = text.stdout + text.stderr
    listed = text.split("--grpc-restricted-protocol", 1)[1].split("Allowed protocols:", 1)[1].split("\n\n", 1)[0]
    allowed = {p.strip() for p in listed.replace("\n", " ").split(",")}
    assert set(RESTRICTED_APIS) == allowed - {"health", "metadata", "inference"}


@pytest.mark.parametrize("mode", ["none", "explicit", "poll"])
def test_every_model_control_mode_restricts(mode: str, tmp_path: Path) -> None:
    server = TritonServer(tmp_path, grpc_port=1, http_port=2, metrics_port=3, model_control_mode=mode, admin_key=KEY)
    assert_all_restricted(server.command(find_triton(), tmp_path))


def test_a_key_that_would_break_the_flag_is_refused(tmp_path: Path) -> None:
    from facetron.errors import ServerError

    for bad in ("", "short", "k" * 20 + ",logging", "k" * 20 + ":x=y"):
        with pytest.raises(ServerError, match="admin key"):
            TritonServer(tmp_path, admin_key=bad).command(find_triton(), tmp_path)


def entrypoint_command(target: str, mode: str, repo: Path, tmp_path: Path) -> list[str]:
    """The tritonserver command deploy/entrypoint.sh's ``serve`` runs (FACETRON_PRINT_COMMAND=1)."""
    env = dict(os.environ, FACETRON_TARGET=target, FACETRON_IDENTITY_MODE=mode, MODEL_REPOSITORY=str(repo),
               FACETRON_ADMIN_KEY=KEY, FACETRON_PRINT_COMMAND="1", FACETRON_HOME=str(tmp_path),
               PATH=f"{Path(os.sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    out = subprocess.run([str(DEPLOY / "entrypoint.sh"), "serve"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    return [a.replace("***", KEY) for a in out.stdout.split()]


@pytest.mark.parametrize("target", ["cpu", "gpu"])
@pytest.mark.parametrize("mode", ["runtime_lora", "merged"])
def test_every_container_restricts(target: str, mode: str, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for name in ("tokenizer", "unet", "unet_user_alice"):
        (repo / name).mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(f'name: "{name}"\nbackend: "python"\n')
    cmd = entrypoint_command(target, mode, repo, tmp_path)
    assert_all_restricted(cmd)
    assert cmd[0].endswith("/tritonserver") and (cmd[0] == "/opt/tritonserver/bin/tritonserver") == (target == "gpu")
    assert f"--model-control-mode={'explicit' if mode == 'merged' else 'none'}" in cmd
    loads = sorted(a.split("=", 1)[1] for a in cmd if a.startswith("--load-model"))
    # merged: the base models by name; users' merged UNets load on first use (max_merged_models)
    assert loads == (["tokenizer", "unet"] if mode == "merged" else [])
    assert any(a.startswith("--backend-config=python,shm-region-prefix-name=facetron-") for a in cmd)


def test_manifests_and_compose_start_through_the_entrypoint() -> None:
    """No manifest or compose service overrides the entry point, so every server runs the commands above."""
    servers = []
    for name in ("k8s.yaml", "k8s-cpu.yaml"):
        for doc in yaml.safe_load_all((DEPLOY / name).read_text()):
            if doc and doc["kind"] == "Deployment":
                servers += doc["spec"]["template"]["spec"]["containers"]
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    servers += [s for k, s in compose.items() if k.startswith("triton")]
    assert len(servers) >= 4
    for c in servers:
        assert "command" not in c or c["command"] == ["serve"], c
        assert c.get("args", ["serve"]) == ["serve"], c


# --- a real server ------------------------------------------------------------------------------


@pytest.mark.triton
def test_statistics_and_shared_memory_need_the_key(model_repository: Path, tmp_path: Path) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    with TritonServer(model_repository, log_path=tmp_path / "log.txt") as server:  # model control: none
        assert server.admin_headers == {GRPC_ADMIN_HEADER: server.admin_key}
        with grpcclient.InferenceServerClient(server.grpc_url) as raw:
            for headers in (None, {ADMIN_HEADER: server.admin_key}, {GRPC_ADMIN_HEADER: "x" * 32}):
                for call in (raw.get_inference_statistics, raw.get_system_shared_memory_status):
                    with pytest.raises(InferenceServerException, match=f"restricted, expecting header '{GRPC_ADMIN_HEADER}'"):
                        call(headers=headers)
            raw.get_inference_statistics(headers=server.admin_headers)
            raw.get_system_shared_memory_status(headers=server.admin_headers)
            assert raw.is_model_ready("tokenizer")  # health, metadata and inference stay open
        url = f"http://{server.http_url}/v2/models/stats"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(url, headers=server.admin_headers))
        assert refused.value.code == 403
        with urllib.request.urlopen(urllib.request.Request(url, headers=server.http_admin_headers)) as ok:
            assert ok.status == 200


# --- shared-memory names --------------------------------------------------------------------------


def test_regions_carry_the_boot_id() -> None:
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:8]
    assert launcher.new_shm_prefix().startswith(f"facetron-{boot}-")


def test_orphans_are_judged_by_their_lock_not_a_pid() -> None:
    """A restarted container's launcher is PID 1 again: the old one's regions are orphans
    because their lock is free, whatever PID made them; a live server's lock is held."""
    live, dead = launcher.new_shm_prefix(), launcher.new_shm_prefix()
    other_boot = "facetron-0badb007-0badc0de-"
    held = hold_shm_lock(live)
    released = hold_shm_lock(dead)
    os.close(released)  # its owner is gone
    made = [SHM_DIR / f"{p}region_1" for p in (live, dead, other_boot)]
    for path in made:
        path.write_bytes(b"x")
    try:
        removed = remove_orphaned_regions()
        assert SHM_DIR / f"{dead}region_1" in removed and regions(dead) == []
        assert SHM_DIR / f"{other_boot}region_1" in removed
        assert regions(live) == [SHM_DIR / f"{live}lock", SHM_DIR / f"{live}region_1"]
    finally:
        os.close(held)
        for p in (live, dead, other_boot):
            launcher.remove_regions(p)
