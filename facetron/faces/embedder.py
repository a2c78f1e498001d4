"""128-D face embeddings with dlib's ResNet, run in ONNX Runtime.

Chips are ``uint8[N, 150, 150, 3]`` RGB in dlib's layout (see
:mod:`facetron.faces.alignment`). The ONNX model is exported from the ``.dat``
on first use into ``cache_dir("onnx")``, keyed by the ``.dat`` file's sha256.
Identity similarity is the cosine of L2-normalised embeddings; dlib's own rule
(Euclidean distance of raw descriptors < 0.6) is :func:`dlib_same_person`.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Literal

import numpy as np

from facetron.assets import asset_path
from facetron.contract import CHIP_SIZE, EMBEDDING_DIM
from facetron.errors import InvalidInputError
from facetron.paths import cache_dir

DLIB_SAME_PERSON_THRESHOLD = 0.6

_lock = threading.Lock()
_digests: dict[tuple[str, int, int], str] = {}
_sessions: dict[tuple[str, int | None], object] = {}
_torch_nets: dict[str, object] = {}


def _dat_digest(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _digests:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _digests[key] = h.hexdigest()
    return _digests[key]


def embedder_onnx_path(dat_path: str | os.PathLike | None = None, net=None) -> Path:
    """Cached ONNX export of the embedder, ``cache_dir("onnx")/dlib_resnet_v1_<sha>.onnx``.

    Exported atomically on the first call; ``net`` (a loaded ``DlibResNet`` for
    the same ``.dat``) saves parsing the file again.
    """

    dat = Path(dat_path) if dat_path is not None else asset_path("dlib_resnet")
    out = cache_dir("onnx") / f"dlib_resnet_v1_{_dat_digest(dat)[:16]}.onnx"
    if not out.is_file():
        from facetron.faces.embedder_net import export_embedder_onnx, load_dlib_resnet

        export_embedder_onnx(out, net=net if net is not None else load_dlib_resnet(dat))
    return out


def check_chips(chips: np.ndarray, name: str = "faces") -> np.ndarray:
    """Validate ``uint8[N, 150, 150, 3]``; returns a C-contiguous array."""
    if not isinstance(chips, np.ndarray):
        raise InvalidInputError(name, f"expected a numpy array, got {type(chips).__name__}")
    if chips.dtype != np.uint8:
        raise InvalidInputError(name, f"expected dtype uint8, got {chips.dtype}")
    if chips.ndim != 4 or chips.shape[1:] != (CHIP_SIZE, CHIP_SIZE, 3):
        raise InvalidInputError(
            name, f"expected shape [N, {CHIP_SIZE}, {CHIP_SIZE}, 3] (RGB chips), got {list(chips.shape)}")
    return np.ascontiguousarray(chips)


class FaceEmbedder:
    """dlib ResNet face embedder.

    ``backend="onnx"`` (default) runs the exported model in ONNX Runtime on CPU;
    ``backend="torch"`` runs :class:`~facetron.faces.embedder_net.DlibResNet`
    directly (for benchmarks and parity checks).
    """

    def __init__(self, dat_path: str | os.PathLike | None = None,
                 backend: Literal["onnx", "torch"] = "onnx",
                 intra_op_num_threads: int | None = None, batch_size: int = 32):
        if backend not in ("onnx", "torch"):
            raise InvalidInputError("backend", f"must be 'onnx' or 'torch', got {backend!r}")
        if batch_size < 1:
            raise InvalidInputError("batch_size", f"must be >= 1, got {batch_size}")
        self.dat_path = dat_path
        self.backend = backend
        self.intra_op_num_threads = intra_op_num_threads
        self.batch_size = batch_size
        self._session = None

    # -- runners ---------------------------------------------------------------------

    def _ort_session(self):
        """The ONNX Runtime session (exported/opened on first use, shared per file+threads)."""
        if self._session is None:
            import onnxruntime as ort

            path = str(embedder_onnx_path(self.dat_path))
            key = (path, self.intra_op_num_threads)
            with _lock:
                sess = _sessions.get(key)
                if sess is None:
                    opts = ort.SessionOptions()
                    if self.intra_op_num_threads:
                        opts.intra_op_num_threads = self.intra_op_num_threads
                    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
                    _sessions[key] = sess
            self._session = sess
        return self._session

    def _torch_net(self):
        from facetron.faces.embedder_net import load_dlib_resnet

        key = str(self.dat_path)
        with _lock:
            if key not in _torch_nets:
                _torch_nets[key] = load_dlib_resnet(self.dat_path)
            return _torch_nets[key]

    def _run(self, chips: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.backend == "onnx":
            desc, emb = self._ort_session().run(["descriptors", "embeddings"], {"faces": chips})
            return desc, emb
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(chips).permute(0, 3, 1, 2)
            desc = self._torch_net()(x).numpy()
        return desc, l2_normalize(desc)

    def _both(self, chips: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        chips = check_chips(chips)
        if len(chips) == 0:
            empty = np.zeros((0, EMBEDDING_DIM), np.float32)
            return empty, empty.copy()
        parts = [self._run(chips[i:i + self.batch_size]) for i in range(0, len(chips), self.batch_size)]
        return (np.concatenate([p[0] for p in parts]).astype(np.float32, copy=False),
                np.concatenate([p[1] for p in parts]).astype(np.float32, copy=False))

    # -- public ----------------------------------------------------------------------

    def descriptors(self, chips: np.ndarray) -> np.ndarray:
        """Raw dlib descriptors ``float32[N, 128]`` (compare with :func:`dlib_same_person`)."""
        return self._both(chips)[0]

    def embed(self, chips: np.ndarray) -> np.ndarray:
        """L2-normalised embeddings ``float32[N, 128]`` (compare with :func:`cosine_similarity`)."""
        return self._both(chips)[1]


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray | float:
    """Cosine similarity: vectors ``[D]`` give a float, ``[N, D]`` x ``[M, D]`` give ``[N, M]``."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    sim = l2_normalize(np.atleast_2d(a)) @ l2_normalize(np.atleast_2d(b)).T
    return float(sim[0, 0]) if a.ndim == 1 and b.ndim == 1 else sim


def dlib_same_person(desc_a: np.ndarray, desc_b: np.ndarray,
                     threshold: float = DLIB_SAME_PERSON_THRESHOLD) -> bool:
    """dlib's verdict: same person when the Euclidean distance of the raw 128-D
    descriptors is below ``threshold`` (0.6)."""
    a = np.asarray(desc_a, np.float64).reshape(-1)
    b = np.asarray(desc_b, np.float64).reshape(-1)
    if a.shape != b.shape:
        raise InvalidInputError("descriptors", f"shapes differ: {a.shape} vs {b.shape}")
    return bool(np.linalg.norm(a - b) < threshold)
