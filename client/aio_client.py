"""asyncio client over ``tritonclient.grpc.aio``: the same methods as
:class:`~facetron.client.grpc_client.FacetronClient`, awaited.

The gRPC channel is created on first use inside the running event loop (a
``grpc.aio`` channel belongs to one loop); use one client per loop.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Mapping, Sequence

import numpy as np
import tritonclient.grpc.aio as aiogrpc
from tritonclient.utils import InferenceServerException

from facetron.client.grpc_client import (
    DETECTOR_OUTPUTS,
    PORTRAIT_OUTPUTS,
    SELECT_OUTPUTS,
    CallInfo,
    ClientStats,
    Detections,
    PortraitResult,
    RetryPolicy,
    SelectResult,
    _bytes_tensor,
    _images,
    batches,
    channel_args,
    check_url,
    gave_up,
    infer_inputs,
    is_unavailable,
    merge_detections,
    portrait_request,
    portrait_result,
    require_local,
    requested_outputs,
    select_request,
    translate_error,
)
from facetron.errors import FacetronError


class AsyncClientAPI:
    """Awaitable model methods in terms of ``infer_with_info`` (one server or a pool)."""

    async def infer_with_info(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        *,
        timeout_s: float | None = None,
        use_shm: bool = False,
        shm_output_bytes: int | Mapping[str, int] | None = None,
    ) -> tuple[dict[str, np.ndarray], CallInfo]:  # pragma: no cover - abstract
        raise NotImplementedError

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        *,
        timeout_s: float | None = None,
        use_shm: bool = False,
        shm_output_bytes: int | Mapping[str, int] | None = None,
    ) -> dict[str, np.ndarray]:
        """See :meth:`facetron.client.grpc_client.ClientAPI.infer`."""
        out, _ = await self.infer_with_info(
            model, inputs, outputs, timeout_s=timeout_s, use_shm=use_shm, shm_output_bytes=shm_output_bytes
        )
        return out

    async def tokenize(self, prompts: Sequence[str], *, timeout_s: float | None = None) -> np.ndarray:
        if isinstance(prompts, str):
            prompts = [prompts]
        out = await self.infer("tokenizer", {"prompt": _bytes_tensor(prompts)}, ["input_ids"], timeout_s=timeout_s)
        return out["input_ids"]

    async def detect(self, images: np.ndarray, *, timeout_s: float | None = None, use_shm: bool = False) -> Detections:
        images = _images(images, "images")
        parts = [
            await self.infer("face_detector", {"images": b}, DETECTOR_OUTPUTS, timeout_s=timeout_s, use_shm=use_shm)
            for b in batches(images)
        ]
        return merge_detections(parts)

    async def embed(self, faces: np.ndarray, *, timeout_s: float | None = None) -> np.ndarray:
        faces = _images(faces, "faces")
        parts = [(await self.infer("face_embedder", {"faces": b}, ["embeddings"], timeout_s=timeout_s))["embeddings"] for b in batches(faces)]
        return np.concatenate(parts)

    async def select(
        self,
        images: np.ndarray,
        reference_embedding: np.ndarray | None = None,
        user_id: str | None = None,
        top_k: int = 0,
        *,
        timeout_s: float | None = None,
    ) -> SelectResult:
        inputs = select_request(images, reference_embedding, user_id, top_k)
        out = await self.infer("face_select", inputs, SELECT_OUTPUTS, timeout_s=timeout_s)
        return SelectResult(out["images"], out["similarity"].reshape(-1), out["rank"].reshape(-1), out["selected"].reshape(-1))

    async def portrait(
        self,
        user_id: str,
        style: str | None = None,
        prompt: str | None = None,
        num_images: int = 4,
        top_k: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        height: int | None = None,
        width: int | None = None,
        template: np.ndarray | None = None,
        strength: float | None = None,
        negative_prompt: str | None = None,
        scheduler: str | None = None,
        *,
        fuse: bool | None = None,
        timeout_s: float | None = None,
    ) -> PortraitResult:
        inputs = portrait_request(
            user_id, style, prompt, num_images, top_k, steps, guidance, seed, height, width, template, strength,
            negative_prompt, scheduler, fuse,
        )
        out, info = await self.infer_with_info("portrait", inputs, PORTRAIT_OUTPUTS, timeout_s=timeout_s)
        return portrait_result(out, info)


class AsyncFacetronClient(AsyncClientAPI):
    """One Triton server over asyncio gRPC (same knobs as FacetronClient)."""

    def __init__(
        self,
        url: str,
        timeout_s: float = 60.0,
        retry: RetryPolicy | None = None,
        *,
        reconnect_backoff_ms: int | None = None,
    ):
        self.url = check_url(url)
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self.stats = ClientStats()
        self._shm_pending: set[str] = set()  # regions the server still held after a call
        self._reconnect_backoff_ms = reconnect_backoff_ms
        self._client: Any = None

    def _grpc(self) -> Any:
        if self._client is None:
            self._client = aiogrpc.InferenceServerClient(url=self.url, channel_args=channel_args(self._reconnect_backoff_ms))
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            if self._shm_pending:
                from facetron.client.shm import unregister_async

                await unregister_async(client, list(self._shm_pending), 5.0)
                self._shm_pending.clear()
            await client.close()

    async def __aenter__(self) -> "AsyncFacetronClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _timeout(self, timeout_s: float | None) -> float:
        return self.timeout_s if timeout_s is None else timeout_s

    async def is_ready(self, timeout_s: float | None = None) -> bool:
        try:
            return bool(await self._grpc().is_server_ready(client_timeout=self._timeout(timeout_s)))
        except InferenceServerException:
            return False

    async def model_ready(self, model: str, timeout_s: float | None = None) -> bool:
        try:
            return bool(await self._grpc().is_model_ready(model, client_timeout=self._timeout(timeout_s)))
        except InferenceServerException:
            return False

    async def _infer_once(self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str], timeout: float, shm: Any) -> dict[str, np.ndarray]:
        client = self._grpc()
        try:
            if shm is None:
                result = await client.infer(model, infer_inputs(inputs), outputs=requested_outputs(outputs), client_timeout=timeout)
                return {n: result.as_numpy(n) for n in outputs}
            from facetron.client.shm import registered_async

            async with registered_async(client, shm, timeout, self._shm_pending):
                result = await client.infer(model, shm.infer_inputs(), outputs=shm.requested_outputs(), client_timeout=timeout)
                return shm.read_outputs(result)
        except InferenceServerException as exc:
            raise translate_error(exc, self.url, timeout) from None

    async def infer_with_info(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        *,
        timeout_s: float | None = None,
        use_shm: bool = False,
        shm_output_bytes: int | Mapping[str, int] | None = None,
    ) -> tuple[dict[str, np.ndarray], CallInfo]:
        timeout = self._timeout(timeout_s)
        start = time.perf_counter()
        shm = None
        if use_shm:
            from facetron.client.shm import ShmTensors

            require_local(self.url)
            shm = ShmTensors(inputs, outputs, shm_output_bytes)
        attempt = 0
        try:
            while True:
                attempt += 1
                self.stats.add(attempts=1)
                try:
                    out = await self._infer_once(model, inputs, outputs, timeout, shm)
                except FacetronError as err:
                    if attempt < self.retry.attempts and is_unavailable(err):
                        await asyncio.sleep(self.retry.delay(attempt - 1))
                        continue
                    self.stats.add(calls=1, failures=1)
                    raise gave_up(err, attempt) from None
                self.stats.add(calls=1)
                return out, CallInfo(self.url, attempt, time.perf_counter() - start)
        finally:
            if shm is not None:
                shm.close()
