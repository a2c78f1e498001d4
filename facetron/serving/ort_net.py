"""ONNX nets served by python-backend models: ``vae_decoder``,
``vae_encoder`` and each merged ``unet_user_<id>``.

One runtime per model (ONNX Runtime by default, or OpenVINO: the
``runtime`` parameter, :mod:`.runtimes`), with request batching: the requests of
a dynamic batch are concatenated along the batch axis, run once, and split
back. (The runtime-LoRA ``unet`` and ``text_encoder`` add their LoRA bank:
:mod:`.unet`, :mod:`.text_encoder`.)"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnxruntime as ort

from facetron import contract
from facetron.contract import ModelContract, NetParams
from facetron.errors import FacetronError, InvalidInputError
from facetron.serving.backend import error_response, get_input, read_params, response, version_dir
from facetron.serving.runtimes import open_runtime, ort_session



def open_session(path: Path, threads: int | None = None, providers: str = "cpu") -> ort.InferenceSession:
    """An ONNX Runtime session (no idle-thread spinning: cores are shared).

    ``providers="cuda"`` asks for the CUDA provider first (gpu target) and
    fails clearly where onnxruntime has none."""
    if not path.is_file():
        raise FacetronError(f"ONNX file {path} is missing: assemble the repository with `facetron export repository`")
    return ort_session(path, threads, providers)


def net_session(args: dict):
    """The runtime of a net model's ``model.onnx``, configured by its NetParams
    (``runtime``: ONNX Runtime or OpenVINO, :func:`facetron.serving.runtimes.open_runtime`)."""
    params = read_params(args, NetParams)
    return open_runtime(version_dir(args) / "model.onnx", params.runtime, params.intra_op_threads or None,
                        params.providers, precision=params.precision)


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


_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8,
               "tensor(int64)": np.int64}


def check_feed(feed: dict[str, np.ndarray], session) -> dict[str, np.ndarray]:
    """What the graph itself needs beyond the config: dtype, rank and every
    fixed dimension (channels, hidden size) of each input the session takes
    (an ONNX Runtime session or any runtime of :mod:`.runtimes`)."""
    for spec in session.get_inputs():
        arr = feed.get(spec.name)
        if arr is None:
            continue
        want = _ORT_DTYPES.get(spec.type)
        if want is not None and arr.dtype != np.dtype(want):
            raise InvalidInputError(spec.name, f"expected dtype {np.dtype(want)}, got {arr.dtype}")
        if arr.ndim != len(spec.shape):
            raise InvalidInputError(spec.name, f"expected {len(spec.shape)} dimensions, got shape {list(arr.shape)}")
        for axis, (dim, got) in enumerate(zip(spec.shape, arr.shape)):
            if isinstance(dim, int) and dim != got:
                raise InvalidInputError(spec.name, f"dimension {axis} must be {dim} for this model, got shape "
                                                   f"{list(arr.shape)}")
    return feed


def check_finite(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InvalidInputError(name, "holds NaN or infinite values")
    return arr


def check_min_side(arr: np.ndarray, name: str, minimum: int, axes: tuple[int, int], multiple: int = 1) -> np.ndarray:
    h, w = arr.shape[axes[0]], arr.shape[axes[1]]
    if min(h, w) < minimum or h % multiple or w % multiple:
        rule = f"at least {minimum}" + (f" and a multiple of {multiple}" if multiple > 1 else "")
        raise InvalidInputError(name, f"sides must be {rule}, got {w}x{h}")
    return arr


def check_token_ids(ids: np.ndarray, name: str = "input_ids") -> np.ndarray:
    if ids.size and (ids.min() < 0 or ids.max() >= contract.VOCAB_SIZE):
        raise InvalidInputError(name, f"token ids must be in 0..{contract.VOCAB_SIZE - 1}, got {ids.min()}..{ids.max()}")
    return ids


#: per net: the value checks its graph needs (shapes are checked by check_feed)
NET_CHECKS = {
    "text_encoder": check_token_ids,
    "vae_decoder": lambda a, n: check_min_side(check_finite(a, n), n, 1, (2, 3)),
    "vae_encoder": lambda a, n: check_min_side(a, n, 4 * contract.LATENT_FACTOR, (1, 2), contract.LATENT_FACTOR),
}


def net_model(c: ModelContract) -> type:
    """A python-backend model class for a one-input, one-output ONNX net of
    contract ``c`` (``model.onnx`` in its version folder)."""
    (inp,), (out,) = c.inputs, c.outputs
    dtype, ndim = np.dtype(contract.NUMPY_DTYPES[inp.dtype]), len(inp.dims) + 1
    check = NET_CHECKS.get(c.name, lambda a, n: a)

    class NetModel:
        __doc__ = f"The ``{c.name}`` model: {c.doc.splitlines()[0]}"

        def initialize(self, args):
            self.session = net_session(args)

        def _read(self, request):
            arr = check(get_input(request, inp.name, dtype=dtype, ndim=ndim), inp.name)
            return check_feed({inp.name: arr}, self.session)

        def _run(self, feed):
            return {out.name: self.session.run([out.name], feed)[0]}

        def execute(self, requests):
            return run_batched(requests, self._read, self._run)

        def finalize(self):
            self.session = None

    NetModel.__name__ = NetModel.__qualname__ = "".join(p.title() for p in c.name.split("_")) + "Model"
    return NetModel


VaeDecoderModel = net_model(contract.VAE_DECODER)
VaeEncoderModel = net_model(contract.VAE_ENCODER)


def unet_feed(request) -> dict[str, np.ndarray]:
    """``sample``, ``timestep`` (one per item, [N,1] on the wire -> [N]) and
    ``encoder_hidden_states`` of a UNet request, checked."""
    sample = get_input(request, "sample", dtype=np.float32, ndim=4)
    n = sample.shape[0]
    t = get_input(request, "timestep", required=False)
    if t is None or t.dtype != np.float32 or t.size != n:
        got = "nothing" if t is None else f"{t.dtype} {list(t.shape)}"
        raise InvalidInputError("timestep", f"expected FP32 with one value per batch item ({n}), got {got}")
    hidden = get_input(request, "encoder_hidden_states", dtype=np.float32, ndim=3)
    if hidden.shape[0] != n:
        raise InvalidInputError("encoder_hidden_states", f"expected one row per batch item ({n}), got {hidden.shape[0]}")
    check_min_side(sample, "sample", contract.MIN_LATENT_SIDE, (2, 3))
    for name, arr in (("sample", sample), ("timestep", t), ("encoder_hidden_states", hidden)):
        check_finite(arr, name)
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

    def _read(self, request):
        return check_feed(unet_feed(request), self.session)

    def execute(self, requests):
        return run_batched(requests, self._read, self._run)

    def finalize(self):
        self.session = None
