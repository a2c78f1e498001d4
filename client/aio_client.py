"""asyncio client of one Triton server over ``tritonclient.grpc.aio``:
:class:`AsyncFacetronClient`, the asyncio twin of
:class:`~facetron.client.grpc_client.FacetronClient` (same methods, awaited;
same retry plan, ``await asyncio.sleep`` between tries).

The gRPC channel is created on first use inside the running event loop (a
``grpc.aio`` channel belongs to one loop); use one client per loop.
"""

from __future__ import annotations

import asyncio
from typing import Any, Mapping, Sequence

import numpy as np
import tritonclient.grpc.aio as aiogrpc
from tritonclient.utils import InferenceServerException

from facetron.client.api import AsyncClientAPI
from facetron.client.connection import OneServer
from facetron.client.errors import translate_error
from facetron.client.retry import CallInfo, RetryPlan, RetryPolicy
from facetron.client.shm import registered_async, shm_tensors, unregister_async
from facetron.client.tensors import infer_inputs, requested_outputs
from facetron.errors import FacetronError

__all__ = ["AsyncClientAPI", "AsyncFacetronClient"]


class AsyncFacetronClient(OneServer, AsyncClientAPI):
    """One Triton server over asyncio gRPC (same knobs as FacetronClient)."""

    def __init__(
        self,
        url: str,
        timeout_s: float = 60.0,
        retry: RetryPolicy | None = None,
        *,
        reconnect_backoff_ms: int | None = None,
    ):
        OneServer.__init__(self, url, timeout_s, retry, reconnect_backoff_ms)
        self._client: Any = None

    def _grpc(self) -> Any:
        if self._client is None:
            self._client = aiogrpc.InferenceServerClient(url=self.url, channel_args=self._channel_args)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            if self._shm_pending:
                await unregister_async(client, list(self._shm_pending), 5.0, self._admin_headers)
                self._shm_pending.clear()
            await client.close()

    async def __aenter__(self) -> "AsyncFacetronClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # twin: grpc_client.FacetronClient.is_ready
    async def is_ready(self, timeout_s: float | None = None) -> bool:
        try:
            return bool(await self._grpc().is_server_ready(client_timeout=self._timeout(timeout_s)))
        except InferenceServerException:
            return False

    # twin: grpc_client.FacetronClient.model_ready
    async def model_ready(self, model: str, timeout_s: float | None = None) -> bool:
        try:
            return bool(await self._grpc().is_model_ready(model, client_timeout=self._timeout(timeout_s)))
        except InferenceServerException:
            return False

    # twin: grpc_client.FacetronClient._infer_once
    async def _infer_once(
        self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str], timeout: float, shm: Any,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, np.ndarray]:
        client = self._grpc()
        try:
            if shm is None:
                result = await client.infer(model, infer_inputs(inputs), outputs=requested_outputs(outputs), client_timeout=timeout,
                                      headers=headers)
                return {n: result.as_numpy(n) for n in outputs}
            async with registered_async(client, shm, timeout, self._shm_pending, self._admin_headers):
                result = await client.infer(model, shm.infer_inputs(), outputs=shm.requested_outputs(), client_timeout=timeout,
                                      headers=headers)
                return shm.read_outputs(result)
        except InferenceServerException as exc:
            raise translate_error(exc, self.url, timeout) from None

    # twin: grpc_client.FacetronClient.infer_with_info
    async def infer_with_info(
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
        timeout = self._timeout(timeout_s)
        plan = RetryPlan(self.retry, self.stats)
        with shm_tensors(self.url, inputs, outputs, use_shm, shm_output_bytes) as shm:
            while True:
                try:
                    out = await self._infer_once(model, inputs, outputs, timeout, shm, headers)
                except FacetronError as err:
                    await asyncio.sleep(plan.retry_after(err))
                else:
                    return out, plan.succeeded(self.url)
