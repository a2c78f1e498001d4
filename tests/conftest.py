"""Shared fixtures. Tests talk to a real tritonserver on 127.0.0.1 (never a
mock): one server per test session, on free ports, torn down at the end.

The server serves a repository assembled by ``facetron.export.repository``
(the checked-in ``model_repository/`` holds sources; the diffusion models
need exported ONNX artifacts): the face stack + tokenizer, and the diffusion
+ portrait models of the tiny default model, with a session user registry;
and every optional model (``export repository --controlnet / --tiny-vae /
--distill-lora``) from small RANDOM weights made here (no weights ship), so
the checks every served model owes a stranger (tests/test_bad_input_matrix.py,
tests/test_budgets.py) reach ``controlnet``, ``vae_*_tiny`` and ``unet_fewstep``
too. The tests of those models (test_controlnet.py, test_tiny_vae.py,
test_fewstep.py) take the same weights as their diffusers oracles.
"""

from __future__ import annotations

import atexit
import os
import shutil
import secrets
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

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
def controlnet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random ControlNetModel of the tiny default UNet (the session repository's ``controlnet``)."""
    from facetron.export.controlnet import write_random_controlnet

    return write_random_controlnet(tmp_path_factory.mktemp("controlnet") / "controlnet_random", seed=3)


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random AutoencoderTiny (the session repository's ``vae_decoder_tiny`` / ``vae_encoder_tiny``)."""
    from facetron.export.tiny_vae import write_random_tiny_vae

    return write_random_tiny_vae(tmp_path_factory.mktemp("tiny_vae") / "taesd_random", seed=3)


class DistillLora(NamedTuple):
    """One random "distillation" LoRA in two layouts (the same layers and values), its rank and alpha, and the
    weight the session repository merges it at into ``unet_fewstep`` (from the ``kohya`` file)."""

    peft: Path  # diffusers' LCM-LoRA training script's layout (peft names under ``unet.``, the adapter config)
    kohya: Path  # kohya's (``lora_unet_*`` + ``.alpha``: LCM-LoRA's published file)
    rank: int
    alpha: float
    weight: float


def _peft_named(src: Path, out: Path) -> Path:
    """``src`` (facetron's writer: attention layers as ``.lora.down`` / ``.lora.up``, the rest as ``.lora_A`` /
    ``.lora_B``) with peft's names for every layer, the header kept: what diffusers' LCM-LoRA training script
    saves (``save_lora_weights(unet_lora_layers=get_peft_model_state_dict(unet))``). diffusers' loader reads
    this layout faithfully; given the mixed one it drops the attention layers when other kinds are present."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as fh:
        meta = fh.metadata()
        state = {k.replace(".lora.down.weight", ".lora_A.weight").replace(".lora.up.weight", ".lora_B.weight"):
                 fh.get_tensor(k) for k in fh.keys()}
    save_file(state, str(out), metadata=meta)
    return out


def _to_kohya(src: Path, out: Path, alpha: float) -> Path:
    """The same LoRA in kohya's layout (``lora_unet_<module_with_underscores>.lora_down/up.weight`` + ``.alpha``)."""
    import torch
    from safetensors.torch import load_file, save_file

    state = {}
    for key, value in load_file(str(src)).items():
        module, kind = key[len("unet."):].rsplit(".lora_", 1)
        name = "lora_unet_" + module.replace(".", "_")
        state[f"{name}.lora_down.weight" if kind.startswith("A") else f"{name}.lora_up.weight"] = value
        state[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(state, str(out))
    return out


@pytest.fixture(scope="session")
def distill_lora(tmp_path_factory: pytest.TempPathFactory) -> DistillLora:
    """A random "distillation" LoRA of the tiny default UNet over the layer kinds an SD-1.5 LCM-LoRA adapts
    (the session repository's ``unet_fewstep``, merged at weight 0.8)."""
    from facetron.diffusion.base_model import load_base_model
    from facetron.export.distill_lora import LCM_LORA_TARGET_MODULES
    from facetron.training.random_lora import write_random_lora

    folder, rank, alpha = tmp_path_factory.mktemp("distill_lora"), 8, 4.0
    mixed = write_random_lora(folder / "distill_mixed.safetensors", load_base_model().unet, rank=rank, alpha=alpha,
                              seed=41, std=0.05, target_modules=LCM_LORA_TARGET_MODULES)
    peft = _peft_named(mixed, folder / "distill.safetensors")
    return DistillLora(peft, _to_kohya(peft, folder / "distill_kohya.safetensors", alpha), rank, alpha, 0.8)


@pytest.fixture(scope="session")
def full_repository(tmp_path_factory: pytest.TempPathFactory, users_dir: Path, controlnet_dir: Path,
                    tiny_vae_dir: Path, distill_lora: DistillLora) -> Path:
    """Every cpu model, diffusion models exported from the tiny default, with every optional model: the
    ControlNet (+ the unet's control graph), the tiny autoencoder and the few-step UNet."""
    from facetron.export.diffusion_source import DiffusionSource
    from facetron.export.repository import assemble_repository

    out = tmp_path_factory.mktemp("full") / "model_repository"
    source = DiffusionSource(controlnet=controlnet_dir, tiny_vae=tiny_vae_dir, distill_lora=distill_lora.kohya,
                             distill_weight=distill_lora.weight)
    return assemble_repository("cpu", out, diffusion=source, users_dir=users_dir)


class RepositoryGraphs:
    """ONNX Runtime sessions (CPU, one thread) over a repository's served graphs, each opened on first use:
    ``graphs["unet"]`` is ``<repo>/unet/1/model.onnx``, ``graphs["unet/control"]`` the unet's control graph."""

    def __init__(self, repo: Path):
        self.repo, self._sessions = repo, {}

    def folder(self, name: str) -> Path:
        model, _, sub = name.partition("/")
        return self.repo / model / "1" / sub

    def __getitem__(self, name: str):
        import onnxruntime as ort

        from facetron.contract import MODEL_FILE

        if name not in self._sessions:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            self._sessions[name] = ort.InferenceSession(str(self.folder(name) / MODEL_FILE), opts,
                                                        providers=["CPUExecutionProvider"])
        return self._sessions[name]


@pytest.fixture(scope="session")
def repository_graphs(full_repository: Path) -> RepositoryGraphs:
    """The session repository's graphs in process (what the in-process parity tests run)."""
    return RepositoryGraphs(full_repository)


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
