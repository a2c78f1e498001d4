"""Triton's ``/metrics`` (Prometheus text) scraped before and after a load run.

Two sources land on that page: Triton's own per-model counters
(``nv_inference_*``) and facetron's custom metrics from inside the python
models (``facetron_*``, :mod:`facetron.metrics`): time per denoising
step, per portrait stage (generate, fuse, select), the runtime-LoRA bank,
candidates filtered by reason, merged models loaded. :class:`MetricsDelta`
takes one scrape before and one after a run; :func:`figures` turns the
difference into per-stage figures the report shows beside the statistics
API's breakdown (:mod:`facetron.benchmarks.triton_stats`).
"""

from __future__ import annotations

import math
import re
import time
import urllib.request
from typing import Mapping

Sample = tuple[str, tuple[tuple[str, str], ...]]  # (metric name, sorted labels)
Scrape = dict[Sample, float]

_LINE = re.compile(r"^(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')
STAGES = ("generate", "select", "fuse", "score")  # report order; other stage names follow


def parse(text: str) -> Scrape:
    """Prometheus text exposition -> {(name, labels): value} (comments skipped)."""
    out: Scrape = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            continue
        labels = tuple(sorted(_LABEL.findall(m["labels"] or "")))
        try:
            out[(m["name"], labels)] = float(m["value"])
        except ValueError:
            continue
    return out


def scrape(metrics_url: str, timeout_s: float = 10.0) -> Scrape:
    """GET ``http://host:port/metrics`` (``metrics_url`` may be ``host:port``)."""
    url = metrics_url if metrics_url.startswith("http") else f"http://{metrics_url}"
    if not url.rstrip("/").endswith("/metrics"):
        url = url.rstrip("/") + "/metrics"
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return parse(r.read().decode("utf-8", "replace"))


def delta(before: Scrape, after: Scrape) -> Scrape:
    """after - before for every sample in ``after`` (gauges: the value after)."""
    return {k: (v - before.get(k, 0.0)) if not _is_gauge(k[0]) else v for k, v in after.items()}


def _is_gauge(name: str) -> bool:
    return name in ("facetron_lora_bank_bytes", "facetron_lora_bank_entries") or name.startswith("nv_gpu") \
        or name.startswith("nv_cpu") or name.endswith("pending_request_count")


def _sum(d: Scrape, name: str, **want: str) -> float:
    return sum(v for (n, labels), v in d.items() if n == name and all((k, val) in labels for k, val in want.items()))


def _by_label(d: Scrape, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (n, labels), v in d.items():
        if n == name:
            key = dict(labels).get(label, "")
            out[key] = out.get(key, 0.0) + v
    return out


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """Prometheus' histogram_quantile over cumulative ``{le: count}`` (linear within a bucket)."""
    items = sorted(buckets.items())
    if not items or items[-1][1] <= 0:
        return None
    total, rank = items[-1][1], q * items[-1][1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in items:
        if count >= rank:
            if math.isinf(le):
                return prev_le
            width = count - prev_count
            return prev_le + (le - prev_le) * ((rank - prev_count) / width if width > 0 else 1.0)
        prev_le, prev_count = le, count
    return items[-1][0] if not math.isinf(items[-1][0]) else prev_le if total else None


def figures(d: Scrape) -> dict:
    """Per-stage figures from a scrape delta: facetron's custom metrics and Triton's per-model ones."""
    out: dict = {}
    steps = _sum(d, "facetron_denoise_step_seconds_count")
    if steps > 0:
        buckets: dict[float, float] = {}
        for (n, labels), v in d.items():
            if n == "facetron_denoise_step_seconds_bucket":
                le = dict(labels)["le"]
                key = math.inf if le == "+Inf" else float(le)
                buckets[key] = buckets.get(key, 0.0) + v
        p50 = histogram_quantile(0.5, buckets)
        p90 = histogram_quantile(0.9, buckets)
        out["denoise_step"] = {
            "steps": int(steps),
            "mean_ms": round(_sum(d, "facetron_denoise_step_seconds_sum") / steps * 1e3, 2),
            "p50_ms_approx": None if p50 is None else round(p50 * 1e3, 1),
            "p90_ms_approx": None if p90 is None else round(p90 * 1e3, 1),
        }
    stages = {}
    seen = _by_label(d, "facetron_stage_calls_total", "stage")
    for stage in [s for s in STAGES if s in seen] + sorted(set(seen) - set(STAGES)):
        calls = seen[stage]
        if calls > 0:
            stages[stage] = {"calls": int(calls),
                             "ms_per_call": round(_sum(d, "facetron_stage_seconds_total", stage=stage) / calls * 1e3, 2)}
    if stages:
        out["stages"] = stages
    hits, misses = _sum(d, "facetron_lora_bank_hits_total"), _sum(d, "facetron_lora_bank_misses_total")
    if hits + misses > 0:
        out["lora_bank"] = {"hits": int(hits), "misses": int(misses),
                            "hit_rate": round(hits / (hits + misses), 3),
                            "evictions": int(_sum(d, "facetron_lora_bank_evictions_total")),
                            "bytes": int(_sum(d, "facetron_lora_bank_bytes")),
                            "entries": int(_sum(d, "facetron_lora_bank_entries"))}
    candidates = _sum(d, "facetron_candidates_total")
    if candidates > 0:
        out["candidates"] = {"ranked": int(candidates),
                             "filtered": {k: int(v) for k, v in
                                          _by_label(d, "facetron_candidates_filtered_total", "reason").items() if v}}
    merged = _sum(d, "facetron_merged_models_loaded_total")
    if merged:
        out["merged_models_loaded"] = int(merged)
    models = {}
    for model, count in _by_label(d, "nv_inference_request_success", "model").items():
        if count <= 0:
            continue
        models[model] = {
            "requests": int(count),
            "request_ms": round(_sum(d, "nv_inference_request_duration_us", model=model) / count / 1e3, 3),
            "queue_ms": round(_sum(d, "nv_inference_queue_duration_us", model=model) / count / 1e3, 3),
            "compute_infer_ms": round(_sum(d, "nv_inference_compute_infer_duration_us", model=model) / count / 1e3, 3),
        }
    if models:
        out["triton_models"] = dict(sorted(models.items(), key=lambda kv: -kv[1]["request_ms"] * kv[1]["requests"]))
    return out


class MetricsDelta:
    """``with MetricsDelta("127.0.0.1:8002") as m: ...; m.result`` -> :func:`figures` of the run.

    A failed scrape is recorded in ``m.error`` (the run itself is never lost)."""

    def __init__(self, metrics_url: str, settle_s: float = 0.5):
        self.url = metrics_url
        self.settle_s = settle_s  # Triton counts a request a moment after its response
        self.result: dict = {}
        self.error: str | None = None
        self._before: Scrape | None = None

    def __enter__(self) -> "MetricsDelta":
        try:
            self._before = scrape(self.url)
        except OSError as exc:
            self.error = f"scrape before: {exc}"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._before is None:
            return
        time.sleep(self.settle_s)
        try:
            self.result = figures(delta(self._before, scrape(self.url)))
        except OSError as e:
            self.error = f"scrape after: {e}"
