"""Streamed ``portrait`` calls: progress per denoising step over a gRPC
bidirectional stream to the decoupled ``portrait_stream`` model."""

from __future__ import annotations

import queue
import time
from typing import Callable, Mapping

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from facetron.client.errors import translate_error
from facetron.client.tensors import infer_inputs, requested_outputs
from facetron.contract import PORTRAIT_OUTPUTS, PORTRAIT_STREAM
from facetron.errors import ServerError

STREAM_MODEL = PORTRAIT_STREAM.name
FINAL_OUTPUTS = PORTRAIT_OUTPUTS
PROGRESS = "progress"  # [done, total] in every response before the final one

ProgressFn = Callable[[int, int], None]


def stream_portrait(
    url: str,
    inputs: Mapping[str, np.ndarray],
    on_progress: ProgressFn | None = None,
    timeout_s: float = 600.0,
    headers: Mapping[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """Send one portrait request on a stream; call ``on_progress(done, total)``
    for each step; return the final response's outputs.

    Stream errors carry no gRPC status; the model tags the message with it
    (``[status: X]``), which :func:`~facetron.client.errors.translate_error` reads."""
    events: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url=url)
    try:
        try:
            client.start_stream(callback=lambda result, error: events.put((result, error)),
                                stream_timeout=timeout_s, headers=headers)
            client.async_stream_infer(STREAM_MODEL, infer_inputs(inputs),
                                      outputs=requested_outputs((PROGRESS,) + FINAL_OUTPUTS))
        except InferenceServerException as exc:  # e.g. "the stream is no longer in valid state": server down
            err = ServerError(f"{url}: cannot stream to {STREAM_MODEL}: {exc.message() or exc}")
            err.status = "UNAVAILABLE"
            raise err from None
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServerError(f"{url}: no final {STREAM_MODEL} response within {timeout_s:g} s")
            try:
                result, error = events.get(timeout=remaining)
            except queue.Empty:
                continue
            if error is not None:
                if isinstance(error, InferenceServerException):
                    raise translate_error(error, url, timeout_s) from None
                raise ServerError(f"{url}: {error}")
            response = result.get_response()
            names = {o.name for o in response.outputs}
            if "report" in names:
                return {n: result.as_numpy(n) for n in FINAL_OUTPUTS}
            if PROGRESS in names and on_progress is not None:
                done, total = (int(v) for v in result.as_numpy(PROGRESS).reshape(-1)[:2])
                on_progress(done, total)
    finally:
        try:
            client.stop_stream()
        finally:
            client.close()
