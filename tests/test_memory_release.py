"""Memory given back (issue 21): after a big request, a served face / VAE
model's python-backend stub returns near its idle PSS within 10 s.

Each model instance is its own ``triton_python_backend_stub`` process (in the
server's process group); its command line names the model's ``model.py``.
PSS (not RSS: RSS double-counts the shared libraries) is read from
``/proc/<pid>/smaps_rollup``. Without arena shrinkage (ORT's default arena)
these stubs keep the request's peak for good (facetron.net_runtimes.ORT_MEMORY).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from facetron import contract
from facetron.triton.server import TritonServer
from processes import server_processes

pytestmark = pytest.mark.triton

#: the bound: PSS back at most RATIO x idle + SLACK_MB within SETTLE_S after the request
RATIO, SLACK_MB, SETTLE_S = 1.5, 64.0, 10.0


def pss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no Pss line for pid {pid}")


def stub_pid(server: TritonServer, model: str) -> int:
    """The python-backend stub process serving ``model`` (one instance) for ``server``."""
    script = f"{Path(server.model_repository).resolve()}/{model}/1/model.py"
    found = []
    for pid in server_processes(server.process.pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"triton_python_backend_stub") and script.encode() in argv:
            found.append(pid)
    assert len(found) == 1, f"{model}: stub processes {found}"
    return found[0]


def settled(pid: int, bound: float) -> tuple[float, float]:
    """(PSS right after, PSS after it fell within ``bound`` or SETTLE_S passed)."""
    first = now = pss_mb(pid)
    deadline = time.monotonic() + SETTLE_S
    while now > bound and time.monotonic() < deadline:
        time.sleep(0.25)
        now = pss_mb(pid)
    return first, now


def _rgb(n: int, side: int) -> np.ndarray:
    """Smooth RGB noise (faces or not does not matter for memory; MTCNN scans every pyramid level)."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (n, side // 16, side // 16, 3), np.uint8)
    return np.ascontiguousarray(small.repeat(16, axis=1).repeat(16, axis=2))


# The largest requests the final limits accept where they are cheap enough for a < 60 s test; the VAEs
# are sent a 2-item batch (their budget allows 8 at 1024 px: minutes and ~10 GB on the tiny model's
# attention over 16k latent cells, too much for this test).
CASES = {
    "face_detector": lambda: ({"images": _rgb(1, contract.MAX_IMAGE_SIDE)}, ["num_faces"]),
    "face_embedder": lambda: ({"faces": _rgb(contract.FACE_NET_MAX_BATCH, 160)[:, :contract.CHIP_SIZE,
                                                                                 :contract.CHIP_SIZE]},
                              ["embeddings"]),
    "vae_decoder": lambda: ({"latent": np.random.default_rng(0).standard_normal((2, 4, 64, 64)).astype(np.float32)},
                            ["images"]),
    "vae_encoder": lambda: ({"images": _rgb(2, 512)}, ["latent"]),
}


@pytest.mark.parametrize("model", list(CASES))
def test_stub_gives_memory_back(triton: TritonServer, client, model: str) -> None:
    feed, outputs = CASES[model]()
    feed = {k: np.ascontiguousarray(v) for k, v in feed.items()}
    small = {k: v[:1] for k, v in feed.items()}
    if model == "face_detector":
        small = {"images": _rgb(1, 256)}
    client.infer(model, small, outputs)  # warm: sessions open, first allocations made
    pid = stub_pid(triton, model)
    idle = pss_mb(pid)
    bound = RATIO * idle + SLACK_MB
    t0 = time.monotonic()
    client.infer(model, feed, outputs)
    took = time.monotonic() - t0
    after, final = settled(pid, bound)
    print(f"{model}: PSS idle {idle:.0f} MB, right after {after:.0f} MB, settled {final:.0f} MB "
          f"(bound {bound:.0f}); request {took:.1f} s")
    assert final <= bound, (f"{model}: stub {pid} holds {final:.0f} MB PSS {SETTLE_S:.0f} s after a big request "
                            f"(idle {idle:.0f} MB, right after {after:.0f} MB, bound {bound:.0f} MB)")
    assert triton.is_running()
