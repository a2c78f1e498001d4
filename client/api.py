"""The model methods every client offers, in terms of one primitive,
``infer_with_info``, that a one-server client or a server pool implements:
:class:`ClientAPI` for threads, :class:`AsyncClientAPI` for asyncio.

Each method builds an :class:`~facetron.client.requests.Operation` (requests
and how to read their answers, :mod:`facetron.client.requests`) and runs it
with ``_run``; the two classes differ only by ``await`` (a test holds them
to that: tests/test_client_twins.py). ``timeout_s`` bounds one attempt (gRPC
``client_timeout``); ``None`` uses the client's default.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence, TypeVar

import numpy as np

from facetron.client.requests import (
    Detections,
    Operation,
    PortraitResult,
    SelectResult,
    detect_op,
    embed_op,
    portrait_op,
    portrait_request,
    select_op,
    tokenize_op,
    infer_headers,
    user_headers,
    user_of,
)
from facetron.client.retry import CallInfo
from facetron.request import PortraitRequest

R = TypeVar("R")
ProgressFn = Callable[[int, int], None]


# twin: api.AsyncClientAPI
class ClientAPI:
    """Model methods in terms of ``infer_with_info`` (one server or a pool)."""

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
    ) -> tuple[dict[str, np.ndarray], CallInfo]:  # pragma: no cover - abstract
        raise NotImplementedError

    def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        *,
        timeout_s: float | None = None,
        use_shm: bool = False,
        shm_output_bytes: int | Mapping[str, int] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, np.ndarray]:
        """Call ``model`` with named numpy inputs; return the named outputs.

        ``use_shm``: pass the inputs through system shared memory instead of
        the gRPC message (only for a server on this machine; see
        :mod:`facetron.client.shm`). Outputs named in ``shm_output_bytes``
        (name -> largest size in bytes; an int applies to every output) come
        back through shared memory too, the rest over gRPC.

        ``headers``: gRPC metadata; default: where ``inputs`` name one user (``user_id``), that
        user's token from the operator's token store (:func:`infer_headers`).
        """
        out, _ = self.infer_with_info(
            model, inputs, outputs, timeout_s=timeout_s, use_shm=use_shm, shm_output_bytes=shm_output_bytes,
            headers=infer_headers(inputs, headers),
        )
        return out

    def _run(self, op: Operation[R], timeout_s: float | None) -> R:
        """Make the operation's calls in order; read their answers."""
        answers = [self.infer_with_info(c.model, c.inputs, c.outputs, timeout_s=timeout_s, use_shm=c.use_shm,
                                        headers=c.headers) for c in op.calls]
        return op.read(answers)

    def tokenize(self, prompts: Sequence[str], *, timeout_s: float | None = None) -> np.ndarray:
        """CLIP token ids ``int32 [N, 77]`` from the served ``tokenizer``."""
        return self._run(tokenize_op(prompts), timeout_s)

    def detect(self, images: np.ndarray, *, timeout_s: float | None = None, use_shm: bool = False) -> Detections:
        """Faces in RGB uint8 images ``[N, H, W, 3]`` (or one ``[H, W, 3]``);
        batches above the model's max batch size are split and re-joined."""
        return self._run(detect_op(images, use_shm), timeout_s)

    def embed(self, faces: np.ndarray, *, timeout_s: float | None = None) -> np.ndarray:
        """L2-normalised 128-D embeddings ``float32 [N, 128]`` of aligned 150² chips."""
        return self._run(embed_op(faces), timeout_s)

    def select(
        self,
        images: np.ndarray,
        reference_embedding: np.ndarray | None = None,
        user_id: str | None = None,
        top_k: int = 0,
        *,
        timeout_s: float | None = None,
        token: str | None = None,
    ) -> SelectResult:
        """Rank candidates by identity against a reference embedding or a registered user
        (``token``: the user's; default: the one the operator's token store keeps)."""
        return self._run(select_op(images, reference_embedding, user_id, top_k, token), timeout_s)

    def portrait(
        self,
        user_id: str | PortraitRequest,
        *,
        timeout_s: float | None = None,
        token: str | None = None,
        on_progress: Callable[[int, int], None] | None = None,
        **fields: Any,
    ) -> PortraitResult:
        """Portraits of ``user_id``, best first (the one call a client makes).

        ``fields``: those of :class:`facetron.request.PortraitRequest` (style,
        prompt, num_images, top_k, steps, guidance, seed, height, width, template,
        strength, negative_prompt, scheduler, fuse, fusion_strength,
        cache_interval), checked with the server's own rules before any call; or
        pass a ``PortraitRequest`` itself. Ranked by the generated faces
        (``result.ranked_by``); ``fusion_strength`` in [0, 1] blends the user's
        best photo into each face (0 or ``fuse=False``: no fusion; None: the
        server's default); ``cache_interval`` N > 1 caches the UNet's deep
        features for N - 1 steps (1 = off, the server's default).

        With ``on_progress(done, total)`` a one-server client sends the call
        over a gRPC stream to the decoupled ``portrait_stream`` model, which
        reports every denoising step (no retries mid-stream); a pool ignores it.

        ``token``: the user's secret (``facetron users token``); default: the one the
        operator's token store keeps (:mod:`facetron.token_store`). Without the right
        one the server answers NOT_FOUND, as for an unknown user."""
        op = portrait_op(portrait_request(user_id, **fields), user_headers(user_of(user_id), token))
        if on_progress is not None:
            return self._streamed(op, on_progress, timeout_s)
        return self._run(op, timeout_s)

    def _streamed(self, op: Operation[R], on_progress: ProgressFn, timeout_s: float | None) -> R:
        """``op`` with progress reports; here (a pool): an ordinary call, no reports."""
        return self._run(op, timeout_s)


# twin: api.ClientAPI
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
        headers: Mapping[str, str] | None = None,
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
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, np.ndarray]:
        """See :meth:`ClientAPI.infer`."""
        out, _ = await self.infer_with_info(
            model, inputs, outputs, timeout_s=timeout_s, use_shm=use_shm, shm_output_bytes=shm_output_bytes,
            headers=infer_headers(inputs, headers),
        )
        return out

    async def _run(self, op: Operation[R], timeout_s: float | None) -> R:
        answers = [await self.infer_with_info(c.model, c.inputs, c.outputs, timeout_s=timeout_s, use_shm=c.use_shm,
                                              headers=c.headers) for c in op.calls]
        return op.read(answers)

    async def tokenize(self, prompts: Sequence[str], *, timeout_s: float | None = None) -> np.ndarray:
        """See :meth:`ClientAPI.tokenize`."""
        return await self._run(tokenize_op(prompts), timeout_s)

    async def detect(self, images: np.ndarray, *, timeout_s: float | None = None, use_shm: bool = False) -> Detections:
        """See :meth:`ClientAPI.detect`."""
        return await self._run(detect_op(images, use_shm), timeout_s)

    async def embed(self, faces: np.ndarray, *, timeout_s: float | None = None) -> np.ndarray:
        """See :meth:`ClientAPI.embed`."""
        return await self._run(embed_op(faces), timeout_s)

    async def select(
        self,
        images: np.ndarray,
        reference_embedding: np.ndarray | None = None,
        user_id: str | None = None,
        top_k: int = 0,
        *,
        timeout_s: float | None = None,
        token: str | None = None,
    ) -> SelectResult:
        """See :meth:`ClientAPI.select`."""
        return await self._run(select_op(images, reference_embedding, user_id, top_k, token), timeout_s)

    async def portrait(
        self,
        user_id: str | PortraitRequest,
        *,
        timeout_s: float | None = None,
        token: str | None = None,
        **fields: Any,
    ) -> PortraitResult:
        """See :meth:`ClientAPI.portrait` (no progress stream here)."""
        op = portrait_op(portrait_request(user_id, **fields), user_headers(user_of(user_id), token))
        return await self._run(op, timeout_s)
