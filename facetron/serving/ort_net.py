"""ONNX nets served by python-backend models: ``text_encoder``,
``vae_decoder``, ``vae_encoder`` and each merged ``unet_user_<id>``.

One ONNX Runtime session per model, with request batching: the requests of
a dynamic batch are concatenated along the batch axis, run once, and split
back. (The runtime-LoRA ``unet`` adds its LoRA bank: :mod:`.unet`.)"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnxruntime as ort

from facetron import contract
from facetron.contract import ModelContract, NetParams
from facetron.errors import FacetronError, InvalidInputError
from facetron.serving.backend import error_response, pb, read_params, response, version_dir

_NP_DTYPES = {"FP32": np.float32, "INT32": np.int32, "UINT8": np.uint8}


def open_session(path: Path, threads: int | None = None, providers: str = "cpu") -> ort.InferenceSession:
    """An ONNX Runtime session (no idle-thread spinning: cores are shared).

    ``providers="cuda"`` asks for the CUDA provider first (gpu target) and
    fails clearly where onnxruntime has none."""
    chain = ["CPUExecutionProvider"]
    if providers == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise FacetronError(f"{path}: the CUDA execution provider is not available in this onnxruntime")
        chain = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if not path.is_file():
        raise FacetronError(f"ONNX file {path} is missing: assemble the repository with `facetron export repository`")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=chain)


def net_session(args: dict) -> ort.InferenceSession:
    """The session of a net model's ``model.onnx``, configured by its NetParams."""
    params = read_params(args, NetParams)
    return open_session(version_dir(args) / "model.onnx", params.intra_op_threads or None, params.providers)


def run_batched(
    requests: Sequence,
    read: Callable[[object], dict[str, np.ndarray]],
    run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
) -> list:
    """Read each request's feed, run all valid ones as one batch, split outputs.

    Requests whose inputs break a rule get their own error response; requests
    whose non-batch dims differ from the first valid one run separately."""
    responses: list = [None] * len(requests)
    groups: dict[tuple, list[tuple[int, dict]]] = {}
    for i, request in enumerate(requests):
        try:
            feed = read(request)
            key = tuple((k, v.shape[1:], v.dtype.str) for k, v in sorted(feed.items()))
            groups.setdefault(key, []).append((i, feed))
        except Exception as exc:  # noqa: BLE001
            responses[i] = error_response(exc)
    for members in groups.values():
        try:
            feed = {k: np.concatenate([f[k] for _, f in members]) for k in members[0][1]}
            out = run(feed)
            start = 0
            for i, f in members:
                n = next(iter(f.values())).shape[0]
                responses[i] = response({k: v[start : start + n] for k, v in out.items()})
                start += n
        except Exception as exc:  # noqa: BLE001
            for i, _ in members:
                responses[i] = error_response(exc)
    return responses


def require(arr: np.ndarray | None, name: str, dtype, ndim: int) -> np.ndarray:
    if arr is None:
        raise InvalidInputError(name, "is required")
    if arr.dtype != np.dtype(dtype):
        raise InvalidInputError(name, f"expected dtype {np.dtype(dtype)}, got {arr.dtype}")
    if arr.ndim != ndim:
        raise InvalidInputError(name, f"expected {ndim} dimensions, got shape {list(arr.shape)}")
    return arr


def _tensor(request, name: str) -> np.ndarray | None:
    t = pb().get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy()


def net_model(c: ModelContract) -> type:
    """A python-backend model class for a one-input, one-output ONNX net of
    contract ``c`` (``model.onnx`` in its version folder)."""
    (inp,), (out,) = c.inputs, c.outputs
    dtype, ndim = _NP_DTYPES[inp.dtype], len(inp.dims) + 1

    class NetModel:
        __doc__ = f"The ``{c.name}`` model: {c.doc.splitlines()[0]}"

        def initialize(self, args):
            self.session = net_session(args)

        def _read(self, request):
            return {inp.name: require(_tensor(request, inp.name), inp.name, dtype, ndim)}

        def _run(self, feed):
            return {out.name: self.session.run([out.name], feed)[0]}

        def execute(self, requests):
            return run_batched(requests, self._read, self._run)

        def finalize(self):
            self.session = None

    NetModel.__name__ = NetModel.__qualname__ = "".join(p.title() for p in c.name.split("_")) + "Model"
    return NetModel


TextEncoderModel = net_model(contract.TEXT_ENCODER)
VaeDecoderModel = net_model(contract.VAE_DECODER)
VaeEncoderModel = net_model(contract.VAE_ENCODER)


def unet_feed(request) -> dict[str, np.ndarray]:
    """``sample``, ``timestep`` (one per item, [N,1] on the wire -> [N]) and
    ``encoder_hidden_states`` of a UNet request, checked."""
    sample = require(_tensor(request, "sample"), "sample", np.float32, 4)
    n = sample.shape[0]
    t = _tensor(request, "timestep")
    if t is None or t.dtype != np.float32 or t.size != n:
        got = "nothing" if t is None else f"{t.dtype} {list(t.shape)}"
        raise InvalidInputError("timestep", f"expected FP32 with one value per batch item ({n}), got {got}")
    hidden = require(_tensor(request, "encoder_hidden_states"), "encoder_hidden_states", np.float32, 3)
    return {"sample": sample, "timestep": t.reshape(n), "encoder_hidden_states": hidden}


class UnetUserModel:
    """One user's merged UNet (serving mode 1, ``unet_user_<id>``): FaceChain's
    way, the user's face (+ style) LoRA fused into the weights, one model per
    user, loaded on demand with explicit model control. The scalable default
    is the runtime-LoRA ``unet``; this mode suits few users."""

    def initialize(self, args):
        self.session = net_session(args)

    def _run(self, feed):
        return {"noise_pred": self.session.run(["noise_pred"], feed)[0]}

    def execute(self, requests):
        return run_batched(requests, unet_feed, self._run)

    def finalize(self):
        self.session = None
