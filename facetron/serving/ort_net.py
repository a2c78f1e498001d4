"""One ONNX Runtime session for a python-backend net model, with request
batching: the requests of a dynamic batch are concatenated along the batch
axis, run once, and split back."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from facetron.errors import FacetronError, InvalidInputError


def open_session(path: Path, threads: int | None = None, providers: str = "cpu"):
    """An ONNX Runtime session (no idle-thread spinning: cores are shared).

    ``providers="cuda"`` asks for the CUDA provider first (gpu target) and
    fails clearly where onnxruntime has none."""
    import onnxruntime as ort

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


def version_dir(args: dict) -> Path:
    """The model's version folder (where its artifacts live) from initialize()'s args."""
    return Path(args["model_repository"]) / str(args["model_version"])


def run_batched(
    requests: Sequence,
    read: Callable[[object], dict[str, np.ndarray]],
    run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
) -> list:
    """Read each request's feed, run all valid ones as one batch, split outputs.

    Requests whose inputs break a rule get their own error response; requests
    whose non-batch dims differ from the first valid one run separately."""
    from facetron.serving.triton_utils import error_response, pb

    pb_utils = pb()
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
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(k, np.ascontiguousarray(v[start : start + n])) for k, v in out.items()]
                )
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


def single_net_model(input_name: str, dtype, ndim: int, output_name: str) -> type:
    """A TritonPythonModel class for a one-input, one-output ONNX net in its
    version folder (``model.onnx``), with dynamic-batch concatenation."""
    from facetron.serving.triton_utils import model_parameters, pb

    class TritonPythonModel:
        def initialize(self, args):
            params = model_parameters(args)
            threads = int(params.get("intra_op_threads") or 0) or None
            self.session = open_session(version_dir(args) / "model.onnx", threads, params.get("providers") or "cpu")

        def _read(self, request):
            t = pb().get_input_tensor_by_name(request, input_name)
            return {input_name: require(t.as_numpy() if t is not None else None, input_name, dtype, ndim)}

        def _run(self, feed):
            return {output_name: self.session.run([output_name], feed)[0]}

        def execute(self, requests):
            return run_batched(requests, self._read, self._run)

    return TritonPythonModel


def unet_feed(request) -> dict[str, np.ndarray]:
    """``sample``, ``timestep`` (one per item, [N,1] on the wire -> [N]) and
    ``encoder_hidden_states`` of a UNet request, checked."""
    from facetron.serving.triton_utils import pb

    get = pb().get_input_tensor_by_name
    sample = require(get(request, "sample").as_numpy(), "sample", np.float32, 4)
    n = sample.shape[0]
    t = get(request, "timestep").as_numpy()
    if t.dtype != np.float32 or t.size != n:
        raise InvalidInputError("timestep", f"expected FP32 with one value per batch item ({n}), got {t.dtype} {list(t.shape)}")
    hidden = require(get(request, "encoder_hidden_states").as_numpy(), "encoder_hidden_states", np.float32, 3)
    return {"sample": sample, "timestep": t.reshape(n), "encoder_hidden_states": hidden}
