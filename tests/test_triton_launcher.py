"""The tritonserver launcher and `facetron serve`: readiness, clear errors
for broken repositories and busy ports, and no process left behind."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from facetron.errors import ServerError
from facetron.paths import REPO_ROOT
from facetron.triton.server import SHM_DIR, TritonServer, check_repository, explain_log, regions, remove_orphaned_regions
from processes import server_processes

pytestmark = pytest.mark.triton

FACETRON = [sys.executable, "-m", "facetron.cli"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _gone(pids, timeout_s: float = 15.0) -> bool:
    """Poll until none of ``pids`` is alive (no fixed sleeps)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def _tritonservers(repo: Path) -> set[int]:
    """PIDs of live tritonserver processes serving ``repo`` (other test runs on
    the machine may have servers of their own)."""
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() != "tritonserver":
                    continue
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
                if f"--model-repository={Path(repo).resolve()}" in cmdline and _alive(int(entry.name)):
                    out.add(int(entry.name))
            except OSError:
                pass
    return out


def _none_left(repo: Path, timeout_s: float = 15.0) -> bool:
    """Poll until no tritonserver serves ``repo`` (no fixed sleeps)."""
    deadline = time.monotonic() + timeout_s
    while _tritonservers(repo):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _repo_with_failing_model(root: Path) -> Path:
    repo = root / "repo"
    shutil.copytree(REPO_ROOT / "model_repository" / "tokenizer", repo / "tokenizer")
    broken = repo / "broken_model" / "1"
    broken.mkdir(parents=True)
    (repo / "broken_model" / "config.pbtxt").write_text(
        textwrap.dedent(
            """
            name: "broken_model"
            backend: "python"
            max_batch_size: 0
            input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]
            output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]
            """
        )
    )
    (broken / "model.py").write_text(
        "class TritonPythonModel:\n"
        "    def initialize(self, args):\n"
        "        raise RuntimeError('weights file /nonexistent/unet.onnx is missing')\n"
    )
    return repo


def test_missing_repository_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ServerError, match="does not exist"):
        TritonServer(tmp_path / "nope").start()


def test_malformed_config_names_file(tmp_path: Path) -> None:
    model = tmp_path / "repo" / "bad"
    model.mkdir(parents=True)
    (model / "config.pbtxt").write_text('name: "bad"\nmax_batch_size: "eight"\n')
    with pytest.raises(ServerError, match=r"model 'bad'.*config.pbtxt is malformed"):
        check_repository(tmp_path / "repo")


def test_empty_repository_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "repo").mkdir()
    with pytest.raises(ServerError, match="holds no model folders"):
        TritonServer(tmp_path / "repo").start()


def test_model_that_fails_to_load_names_model_and_cause(tmp_path: Path) -> None:
    repo = _repo_with_failing_model(tmp_path)
    server = TritonServer(repo, log_path=tmp_path / "log.txt")
    with pytest.raises(ServerError) as info:
        server.start()
    message = str(info.value)
    assert "'broken_model' failed to load" in message
    assert "weights file /nonexistent/unet.onnx is missing" in message
    assert _none_left(repo), "a tritonserver process was left behind"


def test_busy_port_is_a_clear_error(model_repository: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ServerError, match=rf"port {port} \(grpc\).*already in use"):
            TritonServer(model_repository, grpc_port=port).start()


def test_public_bind_is_refused_by_default(model_repository: Path) -> None:
    with pytest.raises(ServerError, match="refusing to bind 0.0.0.0"):
        TritonServer(model_repository, host="0.0.0.0").start()


def test_explain_log_extracts_the_model_line() -> None:
    log = (
        "I1126 model_lifecycle.cc:473] loading: m:1\n"
        "E1126 model_lifecycle.cc:654] failed to load 'm' version 1: Internal: boom\n"
    )
    assert explain_log(log) == "model 'm' failed to load: Internal: boom"


def test_stop_leaves_no_process(model_repository: Path, tmp_path: Path) -> None:
    server = TritonServer(model_repository, log_path=tmp_path / "log.txt").start()
    pid = server.process.pid
    group = list(server_processes(pid))
    assert pid in group and len(group) >= 2, "expected server + python stub"
    server.stop()
    assert _gone(group)
    assert regions(server.shm_prefix) == []


def test_kill_9_leaves_no_process_and_no_shared_memory(model_repository: Path, tmp_path: Path) -> None:
    """SIGKILL of the server mid-run (no graceful shutdown): the launcher's
    cleanup removes the stubs and this server's python-backend regions."""
    server = TritonServer(model_repository, log_path=tmp_path / "log.txt").start()
    group = list(server_processes(server.process.pid))
    assert regions(server.shm_prefix), "the python backend should hold regions under this server's prefix"
    os.kill(server.process.pid, signal.SIGKILL)
    server.stop()
    assert _gone(group)
    assert regions(server.shm_prefix) == []


def test_orphaned_regions_of_a_dead_launcher_are_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = SHM_DIR / f"facetron-{dead.pid}-0badc0de-region_1"
    mine = SHM_DIR / f"facetron-{os.getpid()}-0badc0de-region_1"
    orphan.write_bytes(b"x")
    mine.write_bytes(b"x")
    try:
        removed = remove_orphaned_regions()
        assert orphan in removed and not orphan.exists() and mine.exists()
    finally:
        orphan.unlink(missing_ok=True)
        mine.unlink(missing_ok=True)


def test_explicit_control_restricts_repository_and_shared_memory_apis(model_repository: Path, tmp_path: Path) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    server = TritonServer(model_repository, log_path=tmp_path / "log.txt", model_control_mode="explicit",
                          load_models=["tokenizer"]).start()
    try:
        with grpcclient.InferenceServerClient(server.grpc_url) as raw:
            for call in (lambda **kw: raw.unload_model("tokenizer", **kw),
                         lambda **kw: raw.get_model_repository_index(**kw),
                         lambda **kw: raw.get_system_shared_memory_status(**kw)):
                with pytest.raises(InferenceServerException, match="restricted|not allowed|header"):
                    call()
            assert raw.is_model_ready("tokenizer")
            raw.get_model_repository_index(headers=server.admin_headers)
            raw.unload_model("tokenizer", headers=server.admin_headers)
            raw.load_model("tokenizer", headers=server.admin_headers)
            assert raw.is_model_ready("tokenizer")
    finally:
        server.stop()


def test_server_dies_with_a_crashed_caller(model_repository: Path, tmp_path: Path) -> None:
    """The caller is SIGKILLed (no cleanup runs): the server must go too."""
    script = textwrap.dedent(
        f"""
        import sys, time
        from facetron.triton.server import TritonServer
        s = TritonServer({str(model_repository)!r}, log_path={str(tmp_path / 'log.txt')!r}).start()
        print(s.process.pid, flush=True)
        time.sleep(600)
        """
    )
    caller = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(caller.stdout.readline())
        assert _alive(pid)
    finally:
        caller.send_signal(signal.SIGKILL)
        caller.wait()
    assert _gone([pid]), "tritonserver outlived its crashed caller"
    remove_orphaned_regions()  # what the next launcher does at start
    assert regions(f"facetron-{caller.pid}-") == []


def test_cli_serve_broken_repo_one_line_nonzero_no_orphan(tmp_path: Path) -> None:
    repo = _repo_with_failing_model(tmp_path)
    proc = subprocess.run(
        FACETRON + ["serve", "--repo", str(repo), "--log", str(tmp_path / "log.txt")],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("facetron serve: error:") and "'broken_model' failed to load" in lines[0]
    assert _none_left(repo)


def test_cli_serve_missing_repo(tmp_path: Path) -> None:
    proc = subprocess.run(
        FACETRON + ["serve", "--repo", str(tmp_path / "missing")], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and proc.stderr.count("\n") == 1


def test_cli_serve_runs_until_sigterm(model_repository: Path, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        FACETRON + ["serve", "--repo", str(model_repository), "--log", str(tmp_path / "log.txt")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("tritonserver ready: grpc 127.0.0.1:"), line + proc.stderr.read()
        url = line.split()[3]
        from facetron.client import FacetronClient

        with FacetronClient(url) as c:
            assert c.tokenize(["hello"])[0, 1] == 3306
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
