"""Synchronous gRPC client of one Triton server: :class:`FacetronClient`.

A thin driver: the model methods come from :class:`~facetron.client.api.ClientAPI`
(requests and results: :mod:`facetron.client.requests`), the retry decisions
from :class:`~facetron.client.retry.RetryPlan`, errors from
:mod:`facetron.client.errors`. This module holds the connection, one
``_infer_once`` and the loop the plan drives (``time.sleep``);
:mod:`facetron.client.aio_client` is its asyncio twin.

One ``FacetronClient`` may be shared by threads: it holds only a gRPC channel
(thread-safe) and counters behind a lock.

The names this module used to define are still importable from it (see
``__all__``).
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence, TypeVar

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from facetron.client.api import ClientAPI, ProgressFn
from facetron.client.connection import DEFAULT_URL, MAX_MESSAGE_BYTES, OneServer, channel_args, check_url, require_local
from facetron.client.errors import gave_up, invalid_input, is_unavailable, translate_error
from facetron.client.requests import (
    Detections,
    Operation,
    PortraitResult,
    SelectResult,
    batches,
    merge_detections,
    portrait_request,
    portrait_result,
    select_request,
)
from facetron.client.retry import NO_RETRY, CallInfo, ClientStats, RetryPlan, RetryPolicy
from facetron.client.shm import registered, shm_tensors, unregister
from facetron.client.stream import stream_portrait
from facetron.client.tensors import as_wire_array, infer_inputs, requested_outputs, triton_dtype
from facetron.contract import DETECTOR_OUTPUTS, PORTRAIT_OUTPUTS, SELECT_OUTPUTS
from facetron.errors import FacetronError

__all__ = [
    # defined here
    "FacetronClient",
    # re-exported: their home is named in the module doc of each
    "DEFAULT_URL", "MAX_MESSAGE_BYTES", "channel_args", "check_url", "require_local",  # connection
    "gave_up", "invalid_input", "is_unavailable", "translate_error",  # errors
    "NO_RETRY", "CallInfo", "ClientStats", "RetryPolicy",  # retry
    "ClientAPI",  # api
    "Detections", "PortraitResult", "SelectResult", "batches", "merge_detections",  # requests
    "portrait_request", "portrait_result", "select_request",
    "as_wire_array", "infer_inputs", "requested_outputs", "triton_dtype",  # tensors
    "DETECTOR_OUTPUTS", "PORTRAIT_OUTPUTS", "SELECT_OUTPUTS",  # facetron.contract
]

R = TypeVar("R")


class FacetronClient(OneServer, ClientAPI):
    """One Triton server over gRPC.

    ``timeout_s`` bounds every attempt (per-call ``timeout_s`` overrides it);
    ``retry`` retries UNAVAILABLE answers (server down, model not loaded)
    with backoff. ``stats`` counts calls, attempts and failed calls.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        timeout_s: float = 60.0,
        retry: RetryPolicy | None = None,
        *,
        reconnect_backoff_ms: int | None = None,
    ):
        OneServer.__init__(self, url, timeout_s, retry, reconnect_backoff_ms)
        self._client = grpcclient.InferenceServerClient(url=self.url, channel_args=self._channel_args)

    def _grpc(self) -> grpcclient.InferenceServerClient:
        return self._client

    def close(self) -> None:
        if self._shm_pending:
            unregister(self._client, list(self._shm_pending), 5.0, self._admin_headers)
            self._shm_pending.clear()
        self._client.close()

    def __enter__(self) -> "FacetronClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # twin: aio_client.AsyncFacetronClient.is_ready
    def is_ready(self, timeout_s: float | None = None) -> bool:
        """Server ready (one try, no retries; False on any error)."""
        try:
            return bool(self._grpc().is_server_ready(client_timeout=self._timeout(timeout_s)))
        except InferenceServerException:
            return False

    # twin: aio_client.AsyncFacetronClient.model_ready
    def model_ready(self, model: str, timeout_s: float | None = None) -> bool:
        """Model ready (one try, no retries; False on any error)."""
        try:
            return bool(self._grpc().is_model_ready(model, client_timeout=self._timeout(timeout_s)))
        except InferenceServerException:
            return False

    def shared_memory_regions(self, timeout_s: float | None = None) -> list[str]:
        """Names of the system shared-memory regions the server has registered."""
        try:
            status = self._client.get_system_shared_memory_status(as_json=True, headers=self._admin_headers,
                                                                  client_timeout=self._timeout(timeout_s))
        except InferenceServerException as exc:
            raise translate_error(exc, self.url, timeout_s) from None
        return sorted(status.get("regions", {}))

    # twin: aio_client.AsyncFacetronClient._infer_once
    def _infer_once(
        self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str], timeout: float, shm: Any,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, np.ndarray]:
        """One attempt (inputs in the message, or in ``shm``'s regions)."""
        client = self._grpc()
        try:
            if shm is None:
                result = client.infer(model, infer_inputs(inputs), outputs=requested_outputs(outputs), client_timeout=timeout,
                                      headers=headers)
                return {n: result.as_numpy(n) for n in outputs}
            with registered(client, shm, timeout, self._shm_pending, self._admin_headers):
                result = client.infer(model, shm.infer_inputs(), outputs=shm.requested_outputs(), client_timeout=timeout,
                                      headers=headers)
                return shm.read_outputs(result)
        except InferenceServerException as exc:
            raise translate_error(exc, self.url, timeout) from None

    # twin: aio_client.AsyncFacetronClient.infer_with_info
    def infer_with_info(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        *,
        timeout_s: float | None = None,
        use_shm: bool = False,
        shm_output_bytes: int | Mapping[str, int] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[dict[str, np.ndarray], CallInfo]:
        """One call: attempts as the retry plan says; the outputs and how it went."""
        timeout = self._timeout(timeout_s)
        plan = RetryPlan(self.retry, self.stats)
        with shm_tensors(self.url, inputs, outputs, use_shm, shm_output_bytes) as shm:
            while True:
                try:
                    out = self._infer_once(model, inputs, outputs, timeout, shm, headers)
                except FacetronError as err:
                    time.sleep(plan.retry_after(err))
                else:
                    return out, plan.succeeded(self.url)

    def _streamed(self, op: Operation[R], on_progress: ProgressFn, timeout_s: float | None) -> R:
        """``op`` (a portrait call) over a gRPC stream, reporting progress."""
        t0 = time.perf_counter()
        out = stream_portrait(self.url, op.calls[0].inputs, on_progress, timeout_s or 600.0, op.calls[0].headers)
        return op.read([(out, CallInfo(self.url, 1, time.perf_counter() - t0))])
