"""Where the time of a Triton call goes, from Triton's own statistics API.

Take :func:`snapshot` before and after a run; :func:`breakdown` subtracts
them and gives, per model that served requests in between, the request and
batch (execution) counts and the mean time per request spent queued and in
compute (input copy, inference, output copy). A BLS model's children are
called through the server, so their statistics appear under their own names:
``face_select`` shows up together with the ``face_detector`` and
``face_embedder`` calls it made.

Triton's counters are cumulative and per model version; ``success.ns`` is
the whole in-server time of a request (queue + compute), so ``other_ms`` =
success - queue - compute is the server's own overhead (scheduling,
response handling) — client-side serialisation and gRPC are *not* in here:
compare with the client latency of the same run to see them.
"""

from __future__ import annotations

import os
import time

from typing import Mapping

from facetron.contract import ADMIN_KEY_ENV, GRPC_ADMIN_HEADER, VERSION_FOLDER

Snapshot = dict[str, dict[str, int]]

_COUNTERS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
STAGES = ("queue_ms", "compute_input_ms", "compute_infer_ms", "compute_output_ms", "other_ms")


def _flatten(model_stats: Mapping) -> dict[str, int]:
    """One model's cumulative counters as ints (the JSON form carries int64 as strings)."""
    inf = model_stats.get("inference_stats", {})
    out = {"inference_count": int(model_stats.get("inference_count", 0)),
           "execution_count": int(model_stats.get("execution_count", 0))}
    for key in _COUNTERS:
        out[f"{key}_count"] = int(inf.get(key, {}).get("count", 0))
        out[f"{key}_ns"] = int(inf.get(key, {}).get("ns", 0))
    return out


def parse(stats_json: Mapping) -> Snapshot:
    """``get_inference_statistics(as_json=True)`` → {"model" or "model:version": counters}."""
    out: Snapshot = {}
    for m in stats_json.get("model_stats", []):
        key = m["name"] if m.get("version") in (None, "", VERSION_FOLDER) else f"{m['name']}:{m['version']}"
        out[key] = _flatten(m)
    return out


def snapshot(client) -> Snapshot:
    """Counters of every loaded model. ``client``: a sync ``tritonclient.grpc`` client,
    or a :class:`facetron.client.FacetronClient` (its underlying client is used)."""
    raw = getattr(client, "_client", client)
    key = os.environ.get(ADMIN_KEY_ENV)  # statistics is a restricted API: the deployment's admin key
    headers = getattr(client, "_admin_headers", None) or ({GRPC_ADMIN_HEADER: key} if key else None)
    return parse(raw.get_inference_statistics(model_name="", headers=headers, as_json=True))


def breakdown(before: Snapshot, after: Snapshot) -> dict[str, dict]:
    """Per model with requests between the snapshots: counts and ms per request by stage."""
    out: dict[str, dict] = {}
    for model, a in after.items():
        b = before.get(model, {})
        d = {k: v - b.get(k, 0) for k, v in a.items()}
        requests = d["success_count"]
        if requests <= 0 and d["fail_count"] <= 0:
            continue
        per = (lambda ns: round(ns / requests / 1e6, 3)) if requests > 0 else (lambda ns: None)
        row = {
            "requests": requests,
            "failed": d["fail_count"],
            "executions": d["execution_count"],
            "avg_batch": round(d["inference_count"] / d["execution_count"], 2) if d["execution_count"] else None,
            "total_ms": per(d["success_ns"]),
            "queue_ms": per(d["queue_ns"]),
            "compute_input_ms": per(d["compute_input_ns"]),
            "compute_infer_ms": per(d["compute_infer_ns"]),
            "compute_output_ms": per(d["compute_output_ns"]),
        }
        if requests > 0:
            inside = d["queue_ns"] + d["compute_input_ns"] + d["compute_infer_ns"] + d["compute_output_ns"]
            row["other_ms"] = round(max(0, d["success_ns"] - inside) / requests / 1e6, 3)
        else:
            row["other_ms"] = None
        out[model] = row
    return dict(sorted(out.items(), key=lambda kv: -(kv[1]["total_ms"] or 0) * kv[1]["requests"]))


class StatsDelta:
    """Context manager: ``with StatsDelta(client) as m: ...; m.result`` is the breakdown."""

    def __init__(self, client):
        self.client = client
        self.result: dict[str, dict] = {}

    def __enter__(self) -> "StatsDelta":
        self._before = snapshot(self.client)
        return self

    def __exit__(self, *exc: object) -> None:
        self.result = breakdown(self._before, settled_snapshot(self.client))


def settled_snapshot(client, timeout_s: float = 2.0, interval_s: float = 0.05):
    """A snapshot taken once two reads in a row agree: Triton updates a model's
    statistics just after it answers, so a read right after the last response
    can miss that request (or a BLS child's)."""
    previous = snapshot(client)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(interval_s)
        current = snapshot(client)
        if current == previous:
            return current
        previous = current
    return previous
