"""Shared fixtures. Tests talk to a real tritonserver on 127.0.0.1 (never a
mock): one server per test session, on free ports, torn down at the end."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from facetron.paths import REPO_ROOT
from facetron.triton_server import TritonServer

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def model_repository() -> Path:
    return REPO_ROOT / "model_repository"


@pytest.fixture(scope="session")
def users_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The user registry the session's server reads (tests add users to it)."""
    return tmp_path_factory.mktemp("users")


@pytest.fixture(scope="session")
def triton(model_repository: Path, users_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TritonServer:
    """A real tritonserver serving the repository's models on loopback."""
    log = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    server = TritonServer(model_repository, log_path=log, env={"FACETRON_USERS_DIR": str(users_dir)})
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def client(triton: TritonServer):
    from facetron.client import FacetronClient

    with FacetronClient(triton.grpc_url, timeout_s=60) as c:
        yield c
