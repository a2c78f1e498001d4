"""Helpers for python-backend models: typed inputs, clear errors, BLS calls.

Every request is handled on its own: a :class:`FacetronError` becomes an
error response with the matching gRPC status (INVALID_ARGUMENT, NOT_FOUND,
...) and the message naming the input and the rule; other requests of the
same batch still succeed, and the server stays READY.
"""

from __future__ import annotations

import json
import traceback
from typing import Any, Callable, Iterable

import numpy as np

from facetron.errors import FacetronError, InvalidInputError, NotFoundError, split_status, tag_status


def pb():
    import triton_python_backend_utils as pb_utils  # only inside the stub

    return pb_utils


def _code(status: str):
    err = pb().TritonError
    return {
        "INVALID_ARGUMENT": err.INVALID_ARG,
        "NOT_FOUND": err.NOT_FOUND,
        "UNAVAILABLE": err.UNAVAILABLE,
        "FAILED_PRECONDITION": err.INTERNAL,
    }.get(status, err.INTERNAL)


def error_response(exc: BaseException):
    """An InferenceResponse carrying ``exc`` as a Triton error."""
    pb_utils = pb()
    if isinstance(exc, FacetronError):
        error = pb_utils.TritonError(tag_status(str(exc), exc.status), _code(exc.status))
    else:
        error = pb_utils.TritonError(f"internal error: {type(exc).__name__}: {exc}", pb_utils.TritonError.INTERNAL)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


def handle_each(requests: Iterable[Any], fn: Callable[[Any], dict[str, np.ndarray]], logger=None) -> list:
    """Run ``fn(request) -> {output name: array}`` per request, errors isolated."""
    pb_utils = pb()
    responses = []
    for request in requests:
        try:
            outputs = fn(request)
            responses.append(
                pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in outputs.items()])
            )
        except Exception as exc:  # noqa: BLE001 - every error must become a response
            if not isinstance(exc, FacetronError) and logger is not None:
                logger.log_error(traceback.format_exc())
            responses.append(error_response(exc))
    return responses


def get_input(request, name: str, dtype: np.dtype | type | None = None, ndim: int | None = None, required: bool = True):
    """The named input as numpy, checked for dtype and rank; None if optional and absent."""
    tensor = pb().get_input_tensor_by_name(request, name)
    if tensor is None:
        if required:
            raise InvalidInputError(name, "is required")
        return None
    arr = tensor.as_numpy()
    if dtype is not None and arr.dtype != np.dtype(dtype):
        raise InvalidInputError(name, f"expected dtype {np.dtype(dtype)}, got {arr.dtype}")
    if ndim is not None and arr.ndim != ndim:
        raise InvalidInputError(name, f"expected {ndim} dimensions, got shape {list(arr.shape)}")
    return arr


def one_string(arr: np.ndarray, name: str) -> str:
    """The single UTF-8 string of a one-element BYTES tensor."""
    if arr.size != 1:
        raise InvalidInputError(name, f"expected exactly one string, got shape {list(arr.shape)}")
    item = arr.reshape(-1)[0]
    try:
        return item.decode("utf-8") if isinstance(item, bytes) else str(item)
    except UnicodeDecodeError:
        raise InvalidInputError(name, "is not valid UTF-8") from None


def one_scalar(arr: np.ndarray, name: str, dtype):
    """The single value of a one-element numeric tensor of ``dtype``."""
    if arr.dtype != np.dtype(dtype):
        raise InvalidInputError(name, f"expected dtype {np.dtype(dtype)}, got {arr.dtype}")
    if arr.size != 1:
        raise InvalidInputError(name, f"expected one value, got shape {list(arr.shape)}")
    return arr.reshape(-1)[0].item()


def get_string(request, name: str, required: bool = True) -> str | None:
    """A one-element BYTES input decoded as UTF-8."""
    arr = get_input(request, name, required=required)
    return None if arr is None else one_string(arr, name)


def get_scalar(request, name: str, dtype, default=None):
    """A one-element numeric input, or ``default`` when absent."""
    arr = get_input(request, name, required=default is None)
    return default if arr is None else one_scalar(arr, name, dtype)


def model_parameters(args: dict) -> dict[str, str]:
    """``parameters`` of config.pbtxt as a plain dict of strings."""
    config = json.loads(args["model_config"])
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


def bls_infer(model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
    """Call another model of the same server (BLS); raise on its error."""
    pb_utils = pb()
    request = pb_utils.InferenceRequest(
        model_name=model,
        inputs=[pb_utils.Tensor(k, v) for k, v in inputs.items()],
        requested_output_names=outputs,
    )
    response = request.exec()
    if response.has_error():
        error = response.error()
        message = error.message()
        # BLS responses lose the callee's error code (always INTERNAL here), so the
        # status travels in the message tag: a bad input stays INVALID_ARGUMENT and
        # an unknown user NOT_FOUND, however many models deep it was found.
        status, message = split_status(message)
        if status == "INVALID_ARGUMENT":
            raise InvalidInputError.from_message(message)
        if status == "NOT_FOUND":
            raise NotFoundError(message)
        raise FacetronError(f"{model}: {message}")
    return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in outputs}
