"""Helpers for python-backend models: typed inputs, clear errors, BLS calls.

Every request is handled on its own: a :class:`FacetronError` becomes an
error response with the matching gRPC status (the one mapping in
:mod:`facetron.errors`) and the message naming the input and the rule;
other requests of the same batch still succeed, and the server stays READY.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

import numpy as np

from facetron.contract import BLS_TIMEOUT_S, USER_TOKEN_HEADER, ModelParams
from facetron.errors import (
    CancelledError,
    FacetronError,
    InvalidInputError,
    error_for_status,
    split_status,
    tag_status,
    triton_code_name,
)
from facetron.request import one_scalar, one_string

try:  # only inside the python backend's stub; in-process callers never reach pb()
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - outside Triton
    pb_utils = None

P = TypeVar("P", bound=ModelParams)
R = TypeVar("R")


def pb():
    if pb_utils is None:
        raise FacetronError("triton_python_backend_utils is only available inside Triton's python backend")
    return pb_utils


# --- lifecycle --------------------------------------------------------------------------


def read_params(args: dict, cls: type[P]) -> P:
    """The model's typed parameters (facetron.contract) from initialize()'s args."""
    config = json.loads(args["model_config"])
    raw = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
    return cls.from_config(raw)


def is_decoupled(args: dict) -> bool:
    return bool(pb().using_decoupled_model_transaction_policy(json.loads(args["model_config"])))


def version_dir(args: dict) -> Path:
    """The model's version folder (where its artifacts live) from initialize()'s args."""
    return Path(args["model_repository"]) / str(args["model_version"])


def repository_dir(args: dict) -> Path:
    """The model repository the model was loaded from."""
    return Path(args["model_repository"]).parent


# --- responses --------------------------------------------------------------------------


def error_response(exc: BaseException):
    """An InferenceResponse carrying ``exc`` as a Triton error."""
    p = pb()
    if isinstance(exc, FacetronError):
        code = getattr(p.TritonError, triton_code_name(exc.status), p.TritonError.INTERNAL)
        error = p.TritonError(tag_status(str(exc), exc.status), code)
    else:
        error = p.TritonError(f"internal error: {type(exc).__name__}: {exc}", p.TritonError.INTERNAL)
    return p.InferenceResponse(output_tensors=[], error=error)


def response(outputs: Mapping[str, np.ndarray]):
    p = pb()
    return p.InferenceResponse(output_tensors=[p.Tensor(k, np.ascontiguousarray(v)) for k, v in outputs.items()])


def handle_each(requests: Iterable[Any], fn: Callable[[Any], Mapping[str, np.ndarray]], logger=None) -> list:
    """Run ``fn(request) -> {output name: array}`` per request, errors isolated."""
    responses = []
    for request in requests:
        try:
            responses.append(response(fn(request)))
        except Exception as exc:  # noqa: BLE001 - every error must become a response
            if not isinstance(exc, FacetronError) and logger is not None:
                logger.log_error(traceback.format_exc())
            responses.append(error_response(exc))
    return responses


# --- inputs -----------------------------------------------------------------------------


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


def request_arrays(request, names: Iterable[str]) -> dict[str, np.ndarray]:
    """The named inputs present in a Triton request, as numpy."""
    out = {}
    for name in names:
        t = pb().get_input_tensor_by_name(request, name)
        if t is not None:
            out[name] = t.as_numpy()
    return out








def typed_request(request, cls: type[R]) -> R:
    """A Triton request as its typed request (:mod:`facetron.request`): parsed and checked once."""
    return cls.from_arrays(request_arrays(request, cls.MODEL.input_names()))


def user_token(request) -> str | None:
    """The caller's per-user token (facetron.users): the ``facetron-user-token`` gRPC header,
    which the launcher has Triton forward as a request parameter, or a parameter of that name
    (what BLS calls pass on). None when the request carries none."""
    try:
        params = json.loads(request.parameters() or "{}")
    except (AttributeError, ValueError):
        return None
    value = params.get(USER_TOKEN_HEADER) if isinstance(params, dict) else None
    return value if isinstance(value, str) and value else None


def check_callers(request, registry, user_ids: Iterable[str]) -> None:
    """Every named user of the request's items (empty = the base model) must be the
    caller's own: its token in the request (facetron.users.UserRegistry.check_token)."""
    token = user_token(request)
    for user_id in dict.fromkeys(u for u in user_ids if u):
        registry.check_token(user_id, token)


def get_string(request, name: str, required: bool = True) -> str | None:
    """A one-element BYTES input decoded as UTF-8."""
    arr = get_input(request, name, required=required)
    return None if arr is None else one_string(arr, name)


def get_scalar(request, name: str, dtype, default=None):
    """A one-element numeric input, or ``default`` when absent."""
    arr = get_input(request, name, required=default is None)
    return default if arr is None else one_scalar(arr, name, dtype)


# --- BLS --------------------------------------------------------------------------------


def cancel_check(request, what: str = "request") -> Callable[[int, int], None]:
    """A progress callback that stops the work when the client has cancelled
    (checked between denoising steps: a client that gave up frees the server)."""

    def check(done: int, total: int) -> None:
        if request.is_cancelled():
            raise CancelledError(f"{what}: cancelled by the client after step {done} of {total}")

    return check


def bls_infer(model: str, inputs: Mapping[str, np.ndarray], outputs: Iterable[str],
              timeout_s: float = BLS_TIMEOUT_S, token: str | None = None) -> dict[str, np.ndarray]:
    """Call another model of the same server (BLS); raise its error as a facetron error.
    ``token``: the caller's per-user token, passed on as a request parameter (the callee
    checks it like any other door).

    BLS responses lose the callee's error code (always INTERNAL in python
    backend 2.51), so the status travels in the message tag: a bad input
    stays INVALID_ARGUMENT and an unknown user NOT_FOUND, however many
    models deep it was found."""
    p = pb()
    names = list(outputs)
    request = p.InferenceRequest(
        model_name=model,
        inputs=[p.Tensor(k, np.ascontiguousarray(v)) for k, v in inputs.items()],
        requested_output_names=names,
        timeout=int(timeout_s * 1e6),  # microseconds in the callee's queue (its queue policy allows overrides)
        **({"parameters": {USER_TOKEN_HEADER: token}} if token else {}),
    )
    answer = request.exec()
    if answer.has_error():
        status, message = split_status(answer.error().message())
        if status is None:
            raise FacetronError(f"{model}: {message}")
        raise error_for_status(status, message)
    return {name: p.get_output_tensor_by_name(answer, name).as_numpy() for name in names}


def bls_chunked(model: str, inputs: Mapping[str, np.ndarray], output: str | Sequence[str],
                max_batch: int, token: str | None = None) -> np.ndarray | tuple[np.ndarray, ...]:
    """``bls_infer`` over batch chunks of at most ``max_batch`` items, concatenated: the array of
    ``output``, or a tuple of arrays when ``output`` is a sequence of names."""
    names = [output] if isinstance(output, str) else list(output)
    n = len(next(iter(inputs.values())))
    parts: list[dict[str, np.ndarray]] = []
    for s in range(0, n, max_batch):
        parts.append(bls_infer(model, {k: v[s : s + max_batch] for k, v in inputs.items()}, names, token=token))
    joined = tuple(np.concatenate([p[name] for p in parts]) for name in names)
    return joined[0] if isinstance(output, str) else joined
