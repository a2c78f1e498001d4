"""facetron's own Prometheus metrics, from inside the python models.

Triton's built-in metrics (``nv_inference_*``) say how long each *model*
took; they cannot see inside one: the time per denoising step, how a
portrait call splits into generate / fuse / select, how the runtime-LoRA
bank behaves, why candidates were filtered, how often merged UNets were
loaded. :class:`Metrics` adds those through the python backend's custom
metrics API (``pb_utils.MetricFamily``; histograms checked to work in the
bundled python backend 2.51) and Triton serves them on its metrics port
(``/metrics``) beside its own.

Outside Triton (tests, benchmarks, the CLI running the same code in-process)
every method is a no-op. Each python-backend model instance is its own stub
process, so one :class:`Metrics` per process is the natural unit:
:func:`install` makes it in ``initialize`` (labelled with the model's name),
:func:`current` returns it anywhere on the path (a no-op one until then),
:func:`uninstall` drops it in ``finalize`` (metric objects go before their
families, as the backend requires).

Metrics (every series carries ``model``):

=====================================  =========  ===============================
``facetron_denoise_step_seconds``       histogram  one UNet call of the denoising loop
``facetron_stage_seconds_total``        counter    ``stage`` = generate, select, fuse, score
``facetron_stage_calls_total``          counter    calls per ``stage``
``facetron_lora_bank_hits_total``       counter    bank lookups served from memory
``facetron_lora_bank_misses_total``     counter    lookups that read LoRA files
``facetron_lora_bank_evictions_total``  counter    entries dropped to stay in budget
``facetron_lora_bank_bytes``            gauge      bytes held by the bank
``facetron_lora_bank_entries``          gauge      (user, style) entries held
``facetron_candidates_total``           counter    candidates ranked
``facetron_candidates_filtered_total``  counter    ``reason`` = no_face, several_faces, face_too_small, face_too_large, other
``facetron_merged_models_loaded_total`` counter    merged ``unet_user_<id>`` models loaded on first use
=====================================  =========  ===============================
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Optional

try:  # only inside the python backend's stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - outside Triton
    pb_utils = None

PREFIX = "facetron_"
STAGES = ("generate", "select", "fuse", "score")  # run_portrait's timed stages (any name is accepted)
FILTER_REASONS = ("no_face", "several_faces", "face_too_small", "face_too_large", "other")
#: seconds; a tiny-model step on CPU is ~10-50 ms, an SD-1.5 step ~0.05 s (GPU) to ~10 s (2-core CPU)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# name -> (kind, help, label names besides "model")
FAMILIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "denoise_step_seconds": ("HISTOGRAM", "Seconds per denoising step (one UNet call, guidance batch included)", ()),
    "stage_seconds_total": ("COUNTER", "Seconds spent per portrait stage (generate, fuse, select)", ("stage",)),
    "stage_calls_total": ("COUNTER", "Portrait stage runs", ("stage",)),
    "lora_bank_hits_total": ("COUNTER", "Runtime-LoRA bank lookups served from memory", ()),
    "lora_bank_misses_total": ("COUNTER", "Runtime-LoRA bank lookups that read the LoRA files", ()),
    "lora_bank_evictions_total": ("COUNTER", "Runtime-LoRA bank entries evicted to stay within its byte budget", ()),
    "lora_bank_bytes": ("GAUGE", "Bytes of LoRA tensors held by the runtime-LoRA bank", ()),
    "lora_bank_entries": ("GAUGE", "(user, style) entries held by the runtime-LoRA bank", ()),
    "candidates_total": ("COUNTER", "Generated candidates ranked by identity", ()),
    "candidates_filtered_total": ("COUNTER", "Candidates filtered out before ranking, by reason", ("reason",)),
    "merged_models_loaded_total": ("COUNTER", "Merged per-user UNet models loaded on first use (serving mode 1)", ()),
}


def filter_reason(reason: str) -> str:
    """A bounded label for a face-filter reason (facetron.faces.select's free text)."""
    text = (reason or "").lower()
    if text.startswith("0 faces") or "no face" in text:
        return "no_face"
    if "faces (exactly one" in text:
        return "several_faces"
    if "too small" in text:
        return "face_too_small"
    if "too large" in text:
        return "face_too_large"
    return "other"


class Metrics:
    """facetron's custom metrics of one model instance; a no-op without a backend.

    ``backend``: the ``triton_python_backend_utils`` module (default: the one
    importable here, i.e. inside Triton); ``None`` or a module without
    ``MetricFamily`` makes every method a no-op."""

    def __init__(self, model: str, backend: Any = "auto"):
        self.model = model
        self.backend = pb_utils if backend == "auto" else backend
        self.enabled = self.backend is not None and hasattr(self.backend, "MetricFamily")
        self._families: dict[str, Any] = {}
        self._metrics: dict[tuple, Any] = {}
        self._lock = threading.Lock()

    # --- plumbing -------------------------------------------------------------------------

    def _metric(self, name: str, **labels: str):
        """The metric object of ``name`` with ``labels`` (made on first use), or None when disabled."""
        if not self.enabled:
            return None
        key = (name, tuple(sorted(labels.items())))
        metric = self._metrics.get(key)
        if metric is not None:
            return metric
        kind, help_text, _ = FAMILIES[name]
        with self._lock:
            metric = self._metrics.get(key)
            if metric is None:
                family = self._families.get(name)
                if family is None:
                    mf = self.backend.MetricFamily
                    family = mf(name=PREFIX + name, description=help_text, kind=getattr(mf, kind))
                    self._families[name] = family
                all_labels = {"model": self.model, **labels}
                if kind == "HISTOGRAM":
                    metric = family.Metric(labels=all_labels, buckets=list(STEP_BUCKETS))
                else:
                    metric = family.Metric(labels=all_labels)
                self._metrics[key] = metric
        return metric

    def _inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        metric = self._metric(name, **labels)
        if metric is not None and value:
            metric.increment(float(value))

    def _set(self, name: str, value: float, **labels: str) -> None:
        metric = self._metric(name, **labels)
        if metric is not None:
            metric.set(float(value))

    def close(self) -> None:
        """Drop the metric objects, then their families (the backend's order)."""
        with self._lock:
            self._metrics.clear()
            self._families.clear()

    # --- what facetron records ----------------------------------------------------------------

    def denoise_step(self, seconds: float) -> None:
        """One denoising step (one UNet call of the loop) took ``seconds``."""
        metric = self._metric("denoise_step_seconds")
        if metric is not None:
            metric.observe(float(seconds))

    @contextmanager
    def timed_step(self) -> Iterator[None]:
        """``with metrics.timed_step(): noise = unet(...)`` records one denoising step."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.denoise_step(time.perf_counter() - t0)

    def stage(self, stage: str, seconds: float) -> None:
        """A portrait stage (generate, fuse, select) took ``seconds``."""
        self._inc("stage_seconds_total", seconds, stage=stage)
        self._inc("stage_calls_total", 1, stage=stage)

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """``with metrics.timed("fuse"): ...`` records the block as one stage run."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stage(stage, time.perf_counter() - t0)

    def lora_lookup(self, hit: bool) -> None:
        self._inc("lora_bank_hits_total" if hit else "lora_bank_misses_total")

    def lora_evicted(self, count: int = 1) -> None:
        self._inc("lora_bank_evictions_total", count)

    def lora_bank_size(self, size_bytes: int, entries: int) -> None:
        self._set("lora_bank_bytes", size_bytes)
        self._set("lora_bank_entries", entries)

    def candidates(self, reasons: Iterable[str]) -> None:
        """One ranked candidate set: ``reasons[i]`` is "" (kept) or why candidate i was filtered."""
        reasons = list(reasons)
        self._inc("candidates_total", len(reasons))
        for reason in reasons:
            if reason:
                self._inc("candidates_filtered_total", 1, reason=filter_reason(reason))

    def merged_model_loaded(self) -> None:
        self._inc("merged_models_loaded_total")


_CURRENT: Optional[Metrics] = None
_NOOP = Metrics("", backend=None)


def install(model: str, backend: Any = "auto") -> Metrics:
    """This process's metrics, labelled ``model`` (call in ``initialize``)."""
    global _CURRENT
    _CURRENT = Metrics(model, backend)
    return _CURRENT


def current() -> Metrics:
    """This process's metrics; a no-op one when :func:`install` was not called (outside Triton)."""
    return _CURRENT if _CURRENT is not None else _NOOP


def uninstall() -> None:
    """Drop this process's metrics (call in ``finalize``)."""
    global _CURRENT
    if _CURRENT is not None:
        _CURRENT.close()
    _CURRENT = None
