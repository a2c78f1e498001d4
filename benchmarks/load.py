"""Load driver: many concurrent gRPC requests to a real Triton server.

``perf_analyzer`` is not available here, so this drives Triton with
tritonclient's asyncio gRPC API: ``concurrency`` coroutines share one channel
and send requests back to back (closed loop) until a request count or a
duration is reached. Warm-up requests run first at the same concurrency and
are excluded. Latency is client-side (serialisation + gRPC + queue + compute).

Failed requests are counted per error message and reported beside the
latencies of the successful ones — a sweep whose requests failed says so.

Generic over (model, inputs): :func:`preset` has inputs for the served
models (tokenizer, face_detector, face_select, portrait); any other model
works with inputs given as numpy arrays.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from facetron.client.requests import infer_headers
from facetron.contract import CHIP_SIZE, EMBEDDING_DIM
from facetron.errors import InvalidInputError

CONCURRENCY = (1, 2, 4, 8, 16)
MAX_ERROR_KINDS = 5
_REQUEST_ID = re.compile(r"\[request id: [^\]]*\]\s*")


@dataclass(frozen=True)
class LoadCase:
    """One model call to repeat: named numpy inputs and the outputs to fetch."""

    model: str
    inputs: Mapping[str, np.ndarray]
    outputs: Sequence[str]
    label: str | None = None  # shown in reports; defaults to the model name

    @property
    def name(self) -> str:
        return self.label or self.model


@dataclass
class LoadResult:
    """Outcome of one load run at one concurrency."""

    model: str
    concurrency: int
    sent: int
    ok: int
    errors: int
    wall_s: float
    latencies_s: np.ndarray = field(repr=False)
    error_kinds: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict:
        """JSON-able: ms percentiles of successful requests, throughput, error counts."""
        ms = self.latencies_s * 1e3
        pct = {f"p{p}_ms": (round(float(np.percentile(ms, p)), 3) if ms.size else None) for p in (50, 90, 95, 99)}
        return {
            "model": self.model, "concurrency": self.concurrency, "requests": self.sent, "ok": self.ok,
            "errors": self.errors, "error_rate": round(self.errors / self.sent, 4) if self.sent else 0.0,
            "error_kinds": dict(self.error_kinds),
            "mean_ms": round(float(ms.mean()), 3) if ms.size else None, **pct,
            "throughput_rps": round(self.ok / self.wall_s, 2) if self.wall_s > 0 else None,
            "wall_s": round(self.wall_s, 3),
        }


def _grpc_inputs(inputs: Mapping[str, np.ndarray]) -> list:
    """InferInput objects (serialised once, reused by every request)."""
    from tritonclient.grpc import aio
    from tritonclient.utils import np_to_triton_dtype

    tensors = []
    for name, array in inputs.items():
        array = np.asarray(array)
        dtype = "BYTES" if array.dtype == object else np_to_triton_dtype(array.dtype)
        t = aio.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        tensors.append(t)
    return tensors


def _error_key(exc: BaseException) -> str:
    status = getattr(exc, "status", lambda: None)()
    message = getattr(exc, "message", lambda: None)() or str(exc)
    message = _REQUEST_ID.sub("", message).strip()
    first = message.splitlines()[0][:160] if message else ""
    return f"{str(status or type(exc).__name__).replace('StatusCode.', '')}: {first}"


async def _drive(client, case: LoadCase, concurrency: int, requests: int | None, duration_s: float | None,
                 timeout_s: float) -> LoadResult:
    from tritonclient.grpc import aio

    tensors = _grpc_inputs(case.inputs)
    headers = infer_headers(case.inputs, None)  # a case naming a user acts as it: its token from the store
    outputs = [aio.InferRequestedOutput(n) for n in case.outputs]
    latencies: list[float] = []
    errors: dict[str, int] = {}
    state = {"sent": 0}
    deadline = None if duration_s is None else time.perf_counter() + duration_s

    def take() -> bool:
        if requests is not None and state["sent"] >= requests:
            return False
        if deadline is not None and time.perf_counter() >= deadline:
            return False
        state["sent"] += 1
        return True

    async def worker() -> None:
        while take():
            t0 = time.perf_counter()
            try:
                await client.infer(case.model, tensors, outputs=outputs, client_timeout=timeout_s, headers=headers)
            except Exception as exc:  # every failure is counted and named, never dropped
                key = _error_key(exc)
                errors[key] = errors.get(key, 0) + 1
            else:
                latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    n_err = sum(errors.values())
    kinds = dict(sorted(errors.items(), key=lambda kv: -kv[1])[:MAX_ERROR_KINDS])
    if len(errors) > MAX_ERROR_KINDS:
        kinds["(other kinds)"] = n_err - sum(kinds.values())
    return LoadResult(case.name, concurrency, state["sent"], len(latencies), n_err, wall, np.asarray(latencies), kinds)


async def run_load_async(url: str, case: LoadCase, concurrency: int, *, requests: int | None = None,
                         duration_s: float | None = None, warmup: int | None = None,
                         timeout_s: float = 120.0) -> LoadResult:
    """One closed-loop run; ``warmup`` requests (default: ``concurrency``) are sent first and discarded."""
    from tritonclient.grpc import aio

    if concurrency < 1:
        raise InvalidInputError("concurrency", f"must be >= 1, got {concurrency}")
    if requests is None and duration_s is None:
        raise InvalidInputError("requests/duration", "give a request count or a duration")
    client = aio.InferenceServerClient(url=url)
    try:
        n_warm = concurrency if warmup is None else warmup
        if n_warm:
            await _drive(client, case, concurrency, n_warm, None, timeout_s)
        return await _drive(client, case, concurrency, requests, duration_s, timeout_s)
    finally:
        await client.close()


def run_load(url: str, case: LoadCase, concurrency: int, **kwargs) -> LoadResult:
    """Synchronous wrapper of :func:`run_load_async`."""
    return asyncio.run(run_load_async(url, case, concurrency, **kwargs))


def sweep(url: str, case: LoadCase, concurrency: Sequence[int] = CONCURRENCY, *, requests: int | None = None,
          per_worker: int | None = None, duration_s: float | None = None, warmup: int | None = None,
          timeout_s: float = 120.0) -> list[dict]:
    """Summaries of one run per concurrency level.

    Request count per level: ``requests``, or ``per_worker × concurrency``
    (so each worker sends about the same number), or ``duration_s`` seconds."""
    out = []
    for c in concurrency:
        n = requests if requests is not None else (per_worker * c if per_worker is not None else None)
        out.append(run_load(url, case, c, requests=n, duration_s=duration_s, warmup=warmup,
                            timeout_s=timeout_s).summary())
    return out


# ----------------------------------------------------------------------------- inputs of the served models


def _photo(size: int, flip: bool = False) -> np.ndarray:
    import cv2

    from facetron.assets import asset_path
    from facetron.imageio import load_image

    img = cv2.resize(load_image(asset_path("photo_astronaut")), (size, size), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(img[:, ::-1] if flip else img)


def _reference(seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((1, EMBEDDING_DIM)).astype(np.float32)
    return v / np.linalg.norm(v)


def preset(model: str, *, size: int = 256, candidates: int = 2, prompt: str = "a portrait photo of a person",
           steps: int = 2, user_id: str = "bench-user") -> LoadCase:
    """A representative request for a served model (real photo for the face models).

    ``portrait`` needs a registered user (reference embedding + LoRA): the
    suite registers a synthetic ``bench-user`` in its own user registry."""
    if model == "tokenizer":
        return LoadCase(model, {"prompt": np.array([prompt.encode()], dtype=object)}, ["input_ids"])
    if model == "face_detector":
        return LoadCase(model, {"images": _photo(size)[None]}, ["num_faces"], label=f"face_detector {size}²")
    if model == "face_embedder":
        chips = np.ascontiguousarray(_photo(CHIP_SIZE)[None])
        return LoadCase(model, {"faces": chips}, ["embeddings"])
    if model == "face_select":
        images = np.stack([_photo(size, flip=bool(i % 2)) for i in range(candidates)])
        return LoadCase(model, {"images": images, "reference_embedding": _reference()}, ["rank"],
                        label=f"face_select {candidates}×{size}²")
    if model == "portrait":
        inputs = {"prompt": np.array([prompt.encode()], dtype=object), "user_id": np.array([user_id.encode()], dtype=object),
                  "num_images": np.array([1], np.int32),
                  "steps": np.array([steps], np.int32), "seed": np.array([0], np.int64),
                  "top_k": np.array([1], np.int32)}
        return LoadCase(model, inputs, ["images", "report"], label=f"portrait {steps} steps")
    raise InvalidInputError("--model", f"no preset inputs for {model!r} (presets: tokenizer, face_detector, "
                                       "face_embedder, face_select, portrait)")
