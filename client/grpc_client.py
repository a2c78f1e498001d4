"""Synchronous gRPC client for facetron's Triton models, and the pieces the
asyncio client and the server pool share with it.

Layout of this module:

* errors — :func:`translate_error` turns a tritonclient exception into a
  :class:`facetron.errors.FacetronError` subclass that keeps the server's
  message (which names the input and the rule), so the CLI prints one clear
  line and library users can catch by kind;
* retries — :class:`RetryPolicy` (exponential backoff with jitter, on
  UNAVAILABLE only: a bad input or a missing model fails the same way every
  time, retrying it only adds load);
* contracts — request builders and result types of the served models
  (``tokenizer``, ``face_detector``, ``face_embedder``, ``face_select``,
  ``portrait``), written once as plain functions;
* :class:`ClientAPI` — the high-level methods, in terms of one primitive
  ``infer_with_info`` that :class:`FacetronClient` (one server, retries) and
  :class:`facetron.client.pool.ServerPool` (failover) implement;
* :class:`FacetronClient`.

One ``FacetronClient`` may be shared by threads: it holds only a gRPC channel
(thread-safe) and counters behind a lock.
"""

from __future__ import annotations

import json
import math
import random
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from facetron.errors import FacetronError, InvalidInputError, NotFoundError, ServerError

DEFAULT_URL = "127.0.0.1:8001"
MAX_MESSAGE_BYTES = 2**31 - 1
DETECTOR_OUTPUTS = ("boxes", "scores", "landmarks", "num_faces")
SELECT_OUTPUTS = ("images", "similarity", "rank", "selected")
PORTRAIT_OUTPUTS = ("images", "similarity", "rank", "selected", "report")
NET_MAX_BATCH = 64  # face_detector / face_embedder max_batch_size (export/model_configs.py)

# --- errors ----------------------------------------------------------------------------


def _status_name(exc: InferenceServerException) -> str:
    return str(exc.status() or "").replace("StatusCode.", "")


_REQUEST_ID = re.compile(r"^\[request id: [^\]]*\]\s*")
_NAME_RULE = re.compile(r"^([A-Za-z_][\w.\[\]-]*): (.+)$", re.S)
_CORE_INPUT = re.compile(r"input '([^']+)'")
_NOT_READY_STATUS = ("NOT_FOUND", "INTERNAL", "UNKNOWN")
_NOT_READY_MESSAGES = ("has no available versions", "Server not ready", "Server is stopping")


def invalid_input(message: str) -> InvalidInputError:
    """InvalidInputError from a server message: facetron models say "name: rule";
    Triton core says "... input 'name' ..." (then the whole message is the rule)."""
    message = _REQUEST_ID.sub("", message)
    m = _NAME_RULE.match(message)
    if m:
        return InvalidInputError(m.group(1), m.group(2))
    m = _CORE_INPUT.search(message)
    return InvalidInputError(m.group(1) if m else "input", message)


def translate_error(exc: InferenceServerException, url: str, timeout_s: float | None = None) -> FacetronError:
    """The facetron error for a failed gRPC call to ``url``.

    INVALID_ARGUMENT -> InvalidInputError, NOT_FOUND -> NotFoundError,
    UNAVAILABLE / DEADLINE_EXCEEDED -> ServerError (``status`` tells which).

    A server that is shutting down (or reloading a model) says so in other
    ways: NOT_FOUND "... has no available versions" for a model it knows but
    has unloaded, and a python (BLS) model whose inner call hit the stopping
    server returns INTERNAL "... Server not ready". Both mean "this server
    cannot serve now", so both map to UNAVAILABLE: retried, failed over.
    """
    status = _status_name(exc)
    message = exc.message() or str(exc)
    # facetron's models tag messages with their status for BLS hops; the gRPC status says it already
    message = re.sub(r" \[status: [A-Z_]+\]$", "", message)
    err: FacetronError
    if status == "INVALID_ARGUMENT":
        err = invalid_input(message)
    elif status == "UNAVAILABLE" or (status in _NOT_READY_STATUS and any(m in message for m in _NOT_READY_MESSAGES)):
        err = ServerError(f"{url}: {message}")
        err.status = "UNAVAILABLE"
    elif status == "NOT_FOUND" or (not status and ("unknown model" in message or "is not found" in message)):
        err = NotFoundError(message)
    elif status == "DEADLINE_EXCEEDED":
        limit = f" of {timeout_s:g} s" if timeout_s is not None else ""
        err = ServerError(f"{url}: no answer within the timeout{limit} ({message})")
        err.status = "DEADLINE_EXCEEDED"
    else:
        err = FacetronError(f"{url}: {message}" if status in ("UNKNOWN", "CANCELLED", "") else message)
        err.status = status or "INTERNAL"
    err.url = url  # type: ignore[attr-defined]
    return err


# kept for callers of the first version
_translate = translate_error


def is_unavailable(err: BaseException) -> bool:
    """True for errors where another try (later, or on another server) may work."""
    return isinstance(err, FacetronError) and getattr(err, "status", None) == "UNAVAILABLE"


def gave_up(err: FacetronError, attempts: int) -> FacetronError:
    """``err`` with a note of how many attempts were made (when more than one)."""
    if attempts <= 1 or not is_unavailable(err):
        return err
    new = ServerError(f"{err} (gave up after {attempts} attempts)")
    new.status = getattr(err, "status", "UNAVAILABLE")
    new.url = getattr(err, "url", None)  # type: ignore[attr-defined]
    return new


# --- retries ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff and jitter, on UNAVAILABLE only.

    ``attempts`` counts every try (1 = no retry). The n-th retry waits
    ``min(max_backoff_s, backoff_s * multiplier**n)`` scaled down by up to
    ``jitter`` (a random fraction), so clients that failed together do not
    come back together.
    """

    attempts: int = 4
    backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise InvalidInputError("retry.attempts", f"must be >= 1, got {self.attempts}")
        if self.backoff_s < 0 or self.max_backoff_s < 0 or self.multiplier < 1 or not 0 <= self.jitter <= 1:
            raise InvalidInputError("retry", "needs backoff_s >= 0, max_backoff_s >= 0, multiplier >= 1, 0 <= jitter <= 1")

    def delay(self, retry_index: int) -> float:
        """Seconds to wait before retry number ``retry_index`` (0-based)."""
        base = min(self.max_backoff_s, self.backoff_s * self.multiplier**retry_index)
        return base * (1.0 - self.jitter * random.random())


NO_RETRY = RetryPolicy(attempts=1)


# --- call bookkeeping ------------------------------------------------------------------


@dataclass(frozen=True)
class CallInfo:
    """How one call went: the server that answered, tries made, wall time."""

    server: str
    attempts: int
    elapsed_s: float


@dataclass
class ClientStats:
    """Counters of a client (thread-safe): calls, attempts (incl. retries), failed calls."""

    calls: int = 0
    attempts: int = 0
    failures: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, calls: int = 0, attempts: int = 0, failures: int = 0) -> None:
        with self._lock:
            self.calls += calls
            self.attempts += attempts
            self.failures += failures

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {"calls": self.calls, "attempts": self.attempts, "failures": self.failures}


def channel_args(reconnect_backoff_ms: int | None = None) -> list[tuple[str, Any]]:
    """tritonclient's default channel options (large messages, keepalive), plus
    an optional cap on gRPC's reconnect backoff so a restarted server is seen
    again within about that time (gRPC's own default grows up to 120 s)."""
    ka = grpcclient.KeepAliveOptions()
    args: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", ka.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", ka.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", ka.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", ka.http2_max_pings_without_data),
    ]
    if reconnect_backoff_ms is not None:
        ms = max(int(reconnect_backoff_ms), 100)
        args += [
            ("grpc.initial_reconnect_backoff_ms", min(ms, 1000)),
            ("grpc.min_reconnect_backoff_ms", min(ms, 1000)),
            ("grpc.max_reconnect_backoff_ms", ms),
        ]
    return args


def check_url(url: str, name: str = "url") -> str:
    """``host:port`` with a port in 1..65535, else InvalidInputError naming ``name``."""
    host, sep, port = str(url).strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInputError(name, f"{url!r} is not host:port (e.g. 127.0.0.1:8001)")
    return f"{host}:{port}"


# --- tensors ---------------------------------------------------------------------------


def triton_dtype(array: np.ndarray) -> str:
    if array.dtype == object or array.dtype.kind in ("S", "U"):
        return "BYTES"
    return grpcclient.np_to_triton_dtype(array.dtype)


def as_wire_array(array: np.ndarray) -> np.ndarray:
    """numpy array as tritonclient sends it (str arrays become UTF-8 bytes objects)."""
    array = np.asarray(array)
    if array.dtype.kind == "U":
        return np.vectorize(lambda s: s.encode("utf-8"), otypes=[object])(array) if array.size else array.astype(object)
    return array


def infer_inputs(inputs: Mapping[str, np.ndarray]) -> list[grpcclient.InferInput]:
    """tritonclient InferInputs holding ``inputs`` (sent in the gRPC message)."""
    tensors = []
    for name, array in inputs.items():
        array = as_wire_array(array)
        tensor = grpcclient.InferInput(name, list(array.shape), triton_dtype(array))
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def requested_outputs(outputs: Sequence[str]) -> list[grpcclient.InferRequestedOutput]:
    return [grpcclient.InferRequestedOutput(n) for n in outputs]


def _bytes_tensor(values: Sequence[str]) -> np.ndarray:
    return np.array([v.encode("utf-8") for v in values], dtype=object)


def _scalar(value: Any, dtype: type, name: str) -> np.ndarray:
    try:
        return np.array([value], dtype=dtype)
    except (TypeError, ValueError, OverflowError):
        raise InvalidInputError(name, f"expected a number, got {value!r}") from None


def _images(images: np.ndarray, name: str, ndim: int = 4) -> np.ndarray:
    images = np.asarray(images)
    if ndim == 4 and images.ndim == 3:
        images = images[None]
    if images.dtype != np.uint8:
        raise InvalidInputError(name, f"expected dtype uint8 (RGB), got {images.dtype}")
    if images.ndim != ndim or images.shape[-1] != 3:
        want = "[N, H, W, 3]" if ndim == 4 else "[H, W, 3]"
        raise InvalidInputError(name, f"expected shape {want} (RGB), got {list(images.shape)}")
    if images.size == 0:
        raise InvalidInputError(name, f"is empty (shape {list(images.shape)})")
    return np.ascontiguousarray(images)


# --- contracts: face models ------------------------------------------------------------


@dataclass(frozen=True)
class Detections:
    """face_detector output for N images, padded to the largest face count K."""

    boxes: np.ndarray  # float32 [N, K, 4] x1, y1, x2, y2 (px)
    scores: np.ndarray  # float32 [N, K]
    landmarks: np.ndarray  # float32 [N, K, 5, 2]
    num_faces: np.ndarray  # int32 [N]

    def __len__(self) -> int:
        return len(self.num_faces)

    def image(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(boxes, scores, landmarks) of image ``i`` without padding rows."""
        k = int(self.num_faces[i])
        return self.boxes[i, :k], self.scores[i, :k], self.landmarks[i, :k]


def merge_detections(parts: Sequence[Mapping[str, np.ndarray]]) -> Detections:
    """Concatenate face_detector answers of sub-batches (re-padding K)."""
    k = max([p["boxes"].shape[1] for p in parts] + [0])

    def pad(a: np.ndarray) -> np.ndarray:
        widths = [(0, 0), (0, k - a.shape[1])] + [(0, 0)] * (a.ndim - 2)
        return np.pad(a, widths)

    return Detections(
        boxes=np.concatenate([pad(p["boxes"]) for p in parts]),
        scores=np.concatenate([pad(p["scores"]) for p in parts]),
        landmarks=np.concatenate([pad(p["landmarks"]) for p in parts]),
        num_faces=np.concatenate([p["num_faces"].reshape(-1) for p in parts]).astype(np.int32),
    )


def batches(array: np.ndarray, size: int = NET_MAX_BATCH) -> list[np.ndarray]:
    return [array[i : i + size] for i in range(0, len(array), size)]


@dataclass(frozen=True)
class SelectResult:
    """face_select output. ``similarity``/``rank`` are per input candidate
    (rank 0 = best; -1 and NaN = filtered out); ``images`` are the kept
    candidates best first, ``selected`` their input indices."""

    images: np.ndarray
    similarity: np.ndarray
    rank: np.ndarray
    selected: np.ndarray


def select_request(
    images: np.ndarray,
    reference_embedding: np.ndarray | None = None,
    user_id: str | None = None,
    top_k: int = 0,
) -> dict[str, np.ndarray]:
    """face_select inputs (exactly one of reference_embedding / user_id)."""
    if (reference_embedding is None) == (user_id is None):
        raise InvalidInputError("reference_embedding", "give exactly one of reference_embedding or user_id")
    if int(top_k) < 0:
        raise InvalidInputError("top_k", f"must be >= 0 (0 = all), got {top_k}")
    inputs = {"images": _images(images, "images"), "top_k": _scalar(top_k, np.int32, "top_k")}
    if reference_embedding is not None:
        inputs["reference_embedding"] = np.asarray(reference_embedding, np.float32).reshape(1, -1)
    else:
        inputs["user_id"] = _bytes_tensor([str(user_id)])
    return inputs


# --- contracts: portrait ---------------------------------------------------------------


@dataclass(frozen=True)
class PortraitResult:
    """A ``portrait`` answer.

    ``images`` are the kept candidates best first (top_k); ``similarity`` and
    ``rank`` are per generated candidate (rank -1 / NaN = filtered out);
    ``selected`` are the candidate indices of ``images``; ``report`` is the
    server's JSON report (stage timings, which model made what); ``timing``
    is measured here (wall time of the call incl. retries, attempts, server).
    """

    images: np.ndarray
    similarity: np.ndarray
    rank: np.ndarray
    selected: np.ndarray
    report: dict[str, Any]
    timing: dict[str, Any]

    @property
    def server(self) -> str:
        return str(self.timing.get("server", ""))

    def candidates(self) -> list[dict[str, Any]]:
        """One JSON-ready row per generated candidate."""
        chosen = {int(c): i for i, c in enumerate(self.selected)}
        return [
            {
                "index": i,
                "similarity": None if not math.isfinite(float(s)) else round(float(s), 6),
                "rank": int(r),
                "selected": i in chosen,
                "position": chosen.get(i),
            }
            for i, (s, r) in enumerate(zip(self.similarity.tolist(), self.rank.tolist()))
        ]


def portrait_request(
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
    fuse: bool | None = None,
) -> dict[str, np.ndarray]:
    """``portrait`` inputs; ``None`` leaves an optional input to the server's
    default. Checks the rules a client can check, naming the argument."""
    from facetron.users import validate_user_id

    validate_user_id(str(user_id))
    inputs: dict[str, np.ndarray] = {"user_id": _bytes_tensor([str(user_id)])}
    if int(num_images) < 1:
        raise InvalidInputError("num_images", f"must be >= 1, got {num_images}")
    inputs["num_images"] = _scalar(num_images, np.int32, "num_images")
    if top_k is not None:
        if not 0 <= int(top_k) <= int(num_images):
            raise InvalidInputError("top_k", f"must be in 0..num_images ({num_images}), got {top_k}")
        inputs["top_k"] = _scalar(top_k, np.int32, "top_k")
    if steps is not None:
        if int(steps) < 1:
            raise InvalidInputError("steps", f"must be >= 1, got {steps}")
        inputs["steps"] = _scalar(steps, np.int32, "steps")
    if guidance is not None:
        if not math.isfinite(float(guidance)) or float(guidance) < 0:
            raise InvalidInputError("guidance", f"must be a finite number >= 0, got {guidance}")
        inputs["guidance"] = _scalar(guidance, np.float32, "guidance")
    if seed is not None:
        if not 0 <= int(seed) < 2**63:
            raise InvalidInputError("seed", f"must be in 0..2**63-1, got {seed}")
        inputs["seed"] = _scalar(seed, np.int64, "seed")
    for name, value in (("height", height), ("width", width)):
        if value is not None:
            if int(value) < 8 or int(value) % 8:
                raise InvalidInputError(name, f"must be a positive multiple of 8, got {value}")
            inputs[name] = _scalar(value, np.int32, name)
    if strength is not None:
        if not 0.0 < float(strength) <= 1.0:
            raise InvalidInputError("strength", f"must be in (0, 1], got {strength}")
        if template is None:
            raise InvalidInputError("strength", "only applies with a template")
        inputs["strength"] = _scalar(strength, np.float32, "strength")
    if template is not None:
        inputs["template"] = _images(template, "template", ndim=3)
    for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt), ("style", style), ("scheduler", scheduler)):
        if text is not None:
            inputs[name] = _bytes_tensor([str(text)])
    if fuse is not None:
        inputs["fuse"] = np.array([bool(fuse)], dtype=bool)
    return inputs


def portrait_result(out: Mapping[str, np.ndarray], info: CallInfo) -> PortraitResult:
    raw = out["report"].reshape(-1)
    text = raw[0] if raw.size else b"{}"
    text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
    try:
        report = json.loads(text) if text else {}
    except json.JSONDecodeError:
        report = {"raw": text}
    if not isinstance(report, dict):
        report = {"value": report}
    return PortraitResult(
        images=out["images"],
        similarity=out["similarity"].reshape(-1),
        rank=out["rank"].reshape(-1),
        selected=out["selected"].reshape(-1),
        report=report,
        timing={"server": info.server, "attempts": info.attempts, "client_total_s": round(info.elapsed_s, 4)},
    )


# --- the high-level API ----------------------------------------------------------------


class ClientAPI:
    """Model methods in terms of ``infer_with_info`` (one server or a pool).

    ``timeout_s`` bounds one attempt (gRPC ``client_timeout``); ``None`` uses
    the client's default.
    """

    def infer_with_info(
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

    def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        *,
        timeout_s: float | None = None,
        use_shm: bool = False,
        shm_output_bytes: int | Mapping[str, int] | None = None,
    ) -> dict[str, np.ndarray]:
        """Call ``model`` with named numpy inputs; return the named outputs.

        ``use_shm``: pass the inputs through system shared memory instead of
        the gRPC message (only for a server on this machine; see
        :mod:`facetron.client.shm`). Outputs named in ``shm_output_bytes``
        (name -> largest size in bytes; an int applies to every output) come
        back through shared memory too, the rest over gRPC.
        """
        out, _ = self.infer_with_info(
            model, inputs, outputs, timeout_s=timeout_s, use_shm=use_shm, shm_output_bytes=shm_output_bytes
        )
        return out

    def tokenize(self, prompts: Sequence[str], *, timeout_s: float | None = None) -> np.ndarray:
        """CLIP token ids ``int32 [N, 77]`` from the served ``tokenizer``."""
        if isinstance(prompts, str):
            prompts = [prompts]
        return self.infer("tokenizer", {"prompt": _bytes_tensor(prompts)}, ["input_ids"], timeout_s=timeout_s)["input_ids"]

    def detect(self, images: np.ndarray, *, timeout_s: float | None = None, use_shm: bool = False) -> Detections:
        """Faces in RGB uint8 images ``[N, H, W, 3]`` (or one ``[H, W, 3]``);
        batches above the model's max batch size are split and re-joined."""
        images = _images(images, "images")
        parts = [
            self.infer("face_detector", {"images": b}, DETECTOR_OUTPUTS, timeout_s=timeout_s, use_shm=use_shm)
            for b in batches(images)
        ]
        return merge_detections(parts)

    def embed(self, faces: np.ndarray, *, timeout_s: float | None = None) -> np.ndarray:
        """L2-normalised 128-D embeddings ``float32 [N, 128]`` of aligned 150² chips."""
        faces = _images(faces, "faces")
        parts = [self.infer("face_embedder", {"faces": b}, ["embeddings"], timeout_s=timeout_s)["embeddings"] for b in batches(faces)]
        return np.concatenate(parts)

    def select(
        self,
        images: np.ndarray,
        reference_embedding: np.ndarray | None = None,
        user_id: str | None = None,
        top_k: int = 0,
        *,
        timeout_s: float | None = None,
    ) -> SelectResult:
        """Rank candidates by identity against a reference embedding or a registered user."""
        out = self.infer("face_select", select_request(images, reference_embedding, user_id, top_k), SELECT_OUTPUTS, timeout_s=timeout_s)
        return SelectResult(out["images"], out["similarity"].reshape(-1), out["rank"].reshape(-1), out["selected"].reshape(-1))

    def portrait(
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
        on_progress: Callable[[int, int], None] | None = None,
    ) -> PortraitResult:
        """Portraits of ``user_id``, best first (the one call a client makes).

        With ``on_progress(done, total)`` the call goes over a gRPC stream to
        the decoupled ``portrait_stream`` model, which reports every denoising
        step (one server: no retries mid-stream)."""
        inputs = portrait_request(
            user_id, style, prompt, num_images, top_k, steps, guidance, seed, height, width, template, strength,
            negative_prompt, scheduler, fuse,
        )
        if on_progress is not None and hasattr(self, "url"):
            from facetron.client.stream import stream_portrait

            t0 = time.perf_counter()
            out = stream_portrait(self.url, inputs, on_progress, timeout_s or 600.0)
            return portrait_result(out, CallInfo(server=self.url, attempts=1, elapsed_s=time.perf_counter() - t0))
        out, info = self.infer_with_info("portrait", inputs, PORTRAIT_OUTPUTS, timeout_s=timeout_s)
        return portrait_result(out, info)


# --- one server ------------------------------------------------------------------------


def _is_local(url: str) -> bool:
    host = url.rpartition(":")[0].strip("[]").lower()
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def require_local(url: str) -> None:
    if not _is_local(url):
        raise InvalidInputError(
            "use_shm", f"system shared memory needs a server on this machine; {url} is not a loopback address"
        )


class FacetronClient(ClientAPI):
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
        self.url = check_url(url)
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self.stats = ClientStats()
        self._shm_pending: set[str] = set()  # regions the server still held after a call
        self._client = grpcclient.InferenceServerClient(url=self.url, channel_args=channel_args(reconnect_backoff_ms))

    def close(self) -> None:
        if self._shm_pending:
            from facetron.client.shm import unregister

            unregister(self._client, list(self._shm_pending), 5.0)
            self._shm_pending.clear()
        self._client.close()

    def __enter__(self) -> "FacetronClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _timeout(self, timeout_s: float | None) -> float:
        return self.timeout_s if timeout_s is None else timeout_s

    def is_ready(self, timeout_s: float | None = None) -> bool:
        """Server ready (one try, no retries; False on any error)."""
        try:
            return bool(self._client.is_server_ready(client_timeout=self._timeout(timeout_s)))
        except InferenceServerException:
            return False

    def model_ready(self, model: str, timeout_s: float | None = None) -> bool:
        try:
            return bool(self._client.is_model_ready(model, client_timeout=self._timeout(timeout_s)))
        except InferenceServerException:
            return False

    def shared_memory_regions(self, timeout_s: float | None = None) -> list[str]:
        """Names of the system shared-memory regions the server has registered."""
        try:
            status = self._client.get_system_shared_memory_status(as_json=True, client_timeout=self._timeout(timeout_s))
        except InferenceServerException as exc:
            raise translate_error(exc, self.url, timeout_s) from None
        return sorted(status.get("regions", {}))

    def _infer_once(self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str], timeout: float, shm: Any) -> dict[str, np.ndarray]:
        try:
            if shm is None:
                result = self._client.infer(model, infer_inputs(inputs), outputs=requested_outputs(outputs), client_timeout=timeout)
                return {n: result.as_numpy(n) for n in outputs}
            from facetron.client.shm import registered

            with registered(self._client, shm, timeout, self._shm_pending):
                result = self._client.infer(model, shm.infer_inputs(), outputs=shm.requested_outputs(), client_timeout=timeout)
                return shm.read_outputs(result)
        except InferenceServerException as exc:
            raise translate_error(exc, self.url, timeout) from None

    def infer_with_info(
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
                    out = self._infer_once(model, inputs, outputs, timeout, shm)
                except FacetronError as err:
                    if attempt < self.retry.attempts and is_unavailable(err):
                        time.sleep(self.retry.delay(attempt - 1))
                        continue
                    self.stats.add(calls=1, failures=1)
                    raise gave_up(err, attempt) from None
                self.stats.add(calls=1)
                return out, CallInfo(self.url, attempt, time.perf_counter() - start)
        finally:
            if shm is not None:
                shm.close()
