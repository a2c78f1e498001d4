"""Shared fixtures. Tests talk to a real tritonserver on 127.0.0.1 (never a
mock): one server per test session, on free ports, torn down at the end.

The server serves a repository assembled by ``facetron.export.repository``
(the checked-in ``model_repository/`` holds sources; the diffusion models
need exported ONNX artifacts): the face stack + tokenizer, and the diffusion
+ portrait models of the tiny default model, with a session user registry.
"""

from __future__ import annotations

import atexit
import os
import shutil
import secrets
import sys
import tempfile
from pathlib import Path

# No test writes outside its temp dirs: facetron's default build root and user
# registry point into a session sandbox (set before facetron is imported).
_SANDBOX = Path(tempfile.mkdtemp(prefix="facetron-tests-"))
atexit.register(shutil.rmtree, _SANDBOX, True)
os.environ["FACETRON_HOME"] = str(_SANDBOX / "build")
os.environ.pop("FACETRON_BUILD_DIR", None)
os.environ["FACETRON_USERS_DIR"] = str(_SANDBOX / "users")
# one admin key for every server the tests start and every client they make (Triton's restricted APIs)
os.environ["FACETRON_ADMIN_KEY"] = secrets.token_hex(16)

import pytest  # noqa: E402

from facetron.triton.server import TritonServer  # noqa: E402

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))  # tests' own helper modules (face_photos)


@pytest.fixture(scope="session")
def users_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The user registry the session's server reads (tests add users to it)."""
    return tmp_path_factory.mktemp("users")


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fast cpu repository: tokenizer + face stack (no diffusion artifacts)."""
    from facetron.export.repository import assemble_repository

    return assemble_repository("cpu", tmp_path_factory.mktemp("repo") / "model_repository")


@pytest.fixture(scope="session")
def full_repository(tmp_path_factory: pytest.TempPathFactory, users_dir: Path) -> Path:
    """Every cpu model, diffusion models exported from the tiny default."""
    from facetron.export.diffusion_source import DiffusionSource
    from facetron.export.repository import assemble_repository

    out = tmp_path_factory.mktemp("full") / "model_repository"
    return assemble_repository("cpu", out, diffusion=DiffusionSource(), users_dir=users_dir)


@pytest.fixture(scope="session")
def triton(full_repository: Path, users_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TritonServer:
    """A real tritonserver serving every model on loopback."""
    log = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    server = TritonServer(full_repository, log_path=log, env={"FACETRON_USERS_DIR": str(users_dir)})
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def client(triton: TritonServer):
    from facetron.client import FacetronClient

    with FacetronClient(triton.grpc_url, timeout_s=120) as c:
        yield c
