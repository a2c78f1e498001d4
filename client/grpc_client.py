"""Synchronous gRPC client for facetron's Triton models.

Server errors come back as :class:`facetron.errors.FacetronError` subclasses
carrying the server's message (which names the input and the rule), so the
CLI prints one clear line and library users can catch by kind.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from facetron.errors import FacetronError, InvalidInputError, NotFoundError, ServerError

DEFAULT_URL = "127.0.0.1:8001"


def _translate(exc: InferenceServerException, url: str) -> FacetronError:
    status = str(exc.status() or "")
    message = exc.message() or str(exc)
    if "INVALID_ARGUMENT" in status:
        return InvalidInputError.from_message(message)
    if "NOT_FOUND" in status or "unknown model" in message or "is not found" in message:
        return NotFoundError(message)
    if "UNAVAILABLE" in status or "DEADLINE_EXCEEDED" in status:
        return ServerError(f"{url}: {message}")
    err = FacetronError(message)
    err.status = status.replace("StatusCode.", "") or "INTERNAL"
    return err


class FacetronClient:
    """One Triton server over gRPC. ``timeout_s`` bounds every call."""

    def __init__(self, url: str = DEFAULT_URL, timeout_s: float = 60.0):
        self.url = url
        self.timeout_s = timeout_s
        self._client = grpcclient.InferenceServerClient(url=url)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "FacetronClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def is_ready(self) -> bool:
        try:
            return bool(self._client.is_server_ready(client_timeout=self.timeout_s))
        except InferenceServerException:
            return False

    def model_ready(self, model: str) -> bool:
        try:
            return bool(self._client.is_model_ready(model, client_timeout=self.timeout_s))
        except InferenceServerException:
            return False

    def infer(
        self,
        model: str,
        inputs: dict[str, np.ndarray],
        outputs: Sequence[str],
    ) -> dict[str, np.ndarray]:
        """Call ``model`` with named numpy inputs; return the named outputs."""
        tensors = []
        for name, array in inputs.items():
            dtype = "BYTES" if array.dtype == object else grpcclient.np_to_triton_dtype(array.dtype)
            tensor = grpcclient.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        requested = [grpcclient.InferRequestedOutput(n) for n in outputs]
        try:
            result = self._client.infer(model, tensors, outputs=requested, client_timeout=self.timeout_s)
        except InferenceServerException as exc:
            raise _translate(exc, self.url) from None
        return {n: result.as_numpy(n) for n in outputs}

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        """CLIP token ids ``int32 [N, 77]`` from the served ``tokenizer``."""
        data = np.array([p.encode("utf-8") for p in prompts], dtype=object)
        return self.infer("tokenizer", {"prompt": data}, ["input_ids"])["input_ids"]
