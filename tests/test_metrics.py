"""facetron's custom Prometheus metrics (facetron.metrics): no-ops
outside Triton, the right families and labels through the python backend's
API, and — in a real tritonserver — served on /metrics, where the benchmark
suite's scrape (facetron.benchmarks.server_metrics) reads them back as
per-stage figures."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest

from facetron.benchmarks import server_metrics as SM
from facetron import metrics as M


class FakeBackend:
    """Records what the python backend's metrics API would be asked."""

    class MetricFamily:
        COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
        made: list = []

        def __init__(self, name, description, kind):
            self.name, self.kind = name, kind
            FakeBackend.MetricFamily.made.append(self)

        def Metric(self, labels, buckets=None):  # noqa: N802 - the backend's spelling
            assert (buckets is not None) == (self.kind == "histogram")
            return FakeMetric(self.name, labels)


class FakeMetric:
    log: list = []

    def __init__(self, name, labels):
        self.name, self.labels = name, labels

    def increment(self, v):
        FakeMetric.log.append(("inc", self.name, self.labels, v))

    def set(self, v):
        FakeMetric.log.append(("set", self.name, self.labels, v))

    def observe(self, v):
        FakeMetric.log.append(("observe", self.name, self.labels, v))


def test_everything_is_a_noop_outside_triton() -> None:
    m = M.Metrics("portrait", backend=None)
    assert not m.enabled
    m.denoise_step(0.1)
    m.stage("fuse", 0.2)
    with m.timed("select"):
        pass
    m.lora_lookup(True), m.lora_evicted(2), m.lora_bank_size(10, 1), m.candidates(["", "0 faces (exactly one required)"])
    m.merged_model_loaded()
    assert not M.current().enabled  # nothing installed in this process


def test_families_labels_and_reasons() -> None:
    FakeBackend.MetricFamily.made.clear()
    FakeMetric.log.clear()
    m = M.install("portrait", backend=FakeBackend)
    try:
        assert M.current() is m and m.enabled
        m.denoise_step(0.02)
        m.stage("generate", 1.5)
        m.stage("generate", 0.5)
        m.lora_lookup(True), m.lora_lookup(False), m.lora_evicted(), m.lora_bank_size(2048, 3)
        m.candidates(["", "0 faces (exactly one required)", "2 faces (exactly one required)",
                      "face too small (0.05 of the image < 0.1)", "face too large (0.95 of the image > 0.9)"])
        m.merged_model_loaded()
    finally:
        M.uninstall()
    assert not M.current().enabled
    names = {f.name for f in FakeBackend.MetricFamily.made}
    assert names == {M.PREFIX + n for n in M.FAMILIES}
    assert all(f.name.startswith("facetron_") for f in FakeBackend.MetricFamily.made)
    log = FakeMetric.log
    assert ("observe", "facetron_denoise_step_seconds", {"model": "portrait"}, 0.02) in log
    assert sum(v for op, n, lab, v in log if n == "facetron_stage_seconds_total" and lab["stage"] == "generate") == 2.0
    reasons = [lab["reason"] for op, n, lab, v in log if n == "facetron_candidates_filtered_total"]
    assert reasons == ["no_face", "several_faces", "face_too_small", "face_too_large"]
    assert ("inc", "facetron_candidates_total", {"model": "portrait"}, 5.0) in log
    assert ("set", "facetron_lora_bank_bytes", {"model": "portrait"}, 2048.0) in log


def test_scrape_parsing_and_quantiles() -> None:
    text = textwrap.dedent("""\
        # HELP x help
        # TYPE facetron_denoise_step_seconds histogram
        facetron_denoise_step_seconds_count{model="unet"} 4
        facetron_denoise_step_seconds_sum{model="unet"} 0.2
        facetron_denoise_step_seconds_bucket{model="unet",le="0.025"} 1
        facetron_denoise_step_seconds_bucket{model="unet",le="0.05"} 3
        facetron_denoise_step_seconds_bucket{model="unet",le="+Inf"} 4
        nv_inference_request_success{model="portrait",version="1"} 2
        nv_inference_request_duration_us{model="portrait",version="1"} 3000000
    """)
    d = SM.parse(text)
    assert d[("nv_inference_request_success", (("model", "portrait"), ("version", "1")))] == 2
    fig = SM.figures(SM.delta({}, d))
    assert fig["denoise_step"]["steps"] == 4 and fig["denoise_step"]["mean_ms"] == 50.0
    assert 25.0 < fig["denoise_step"]["p50_ms_approx"] <= 50.0
    assert fig["triton_models"]["portrait"]["request_ms"] == 1500.0
    assert SM.histogram_quantile(0.5, {}) is None


MODEL = '''
import numpy as np
import triton_python_backend_utils as pb_utils
from facetron import metrics


class TritonPythonModel:
    def initialize(self, args):
        self.metrics = metrics.install(args["model_name"])

    def execute(self, requests):
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "x").as_numpy()
            m = metrics.current()
            for s in x.reshape(-1):
                m.denoise_step(float(s))
            m.stage("generate", 0.25)
            with m.timed_step():
                pass
            with m.timed("fuse"):
                pass
            m.lora_lookup(hit=False)
            m.lora_lookup(hit=True)
            m.lora_bank_size(4096, 1)
            m.candidates(["", "0 faces (exactly one required)"])
            m.merged_model_loaded()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("y", x)]))
        return out

    def finalize(self):
        metrics.uninstall()
'''

CONFIG = '''
name: "metrics_probe"
backend: "python"
max_batch_size: 0
input [{ name: "x", data_type: TYPE_FP32, dims: [-1] }]
output [{ name: "y", data_type: TYPE_FP32, dims: [-1] }]
'''


def wait_for_requests(url: str, n: int, timeout_s: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = sum(v for (name, labels), v in SM.scrape(url).items()
                   if name == "nv_inference_request_success" and ("model", "metrics_probe") in labels)
        if done >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"Triton's metrics did not count {n} requests within {timeout_s} s")


@pytest.mark.triton
def test_served_on_triton_metrics_port_and_scraped(tmp_path: Path) -> None:
    """A python model recording through facetron.metrics in a real
    tritonserver; the suite's scrape reads the figures back from /metrics."""
    from facetron.client import FacetronClient
    from facetron.triton.server import TritonServer

    repo = tmp_path / "repo"
    (repo / "metrics_probe" / "1").mkdir(parents=True)
    (repo / "metrics_probe" / "config.pbtxt").write_text(CONFIG)
    (repo / "metrics_probe" / "1" / "model.py").write_text(MODEL)
    with TritonServer(repo, log_path=tmp_path / "triton.log") as server:
        url = f"{server.host}:{server.metrics_port}"
        with FacetronClient(server.grpc_url) as client:
            client.infer("metrics_probe", {"x": np.array([0.01], np.float32)}, ["y"])  # families exist from here
            wait_for_requests(url, 1)  # Triton's own counters land a moment after the response
            with SM.MetricsDelta(url) as scraped:
                client.infer("metrics_probe", {"x": np.array([0.02, 0.04, 0.2], np.float32)}, ["y"])
                wait_for_requests(url, 2)
        text = (Path(tmp_path) / "triton.log").read_text()
    assert scraped.error is None, scraped.error
    fig = scraped.result
    assert fig["denoise_step"]["steps"] == 4  # three observed + one timed
    assert fig["denoise_step"]["mean_ms"] == pytest.approx(65.0, abs=0.5)
    assert fig["stages"]["generate"] == {"calls": 1, "ms_per_call": 250.0}
    assert fig["stages"]["fuse"]["calls"] == 1
    assert fig["lora_bank"] == {"hits": 1, "misses": 1, "hit_rate": 0.5, "evictions": 0, "bytes": 4096, "entries": 1}
    assert fig["candidates"] == {"ranked": 2, "filtered": {"no_face": 1}}
    assert fig["merged_models_loaded"] == 1
    assert fig["triton_models"]["metrics_probe"]["requests"] == 1
    assert "MetricFamily" not in text  # no metric API errors in the server log


@pytest.mark.triton
def test_suite_reports_the_scrape_beside_its_own_breakdown(triton, tmp_path: Path) -> None:
    """A load run of the suite scrapes /metrics before and after; the report shows the figures."""
    import json

    from facetron.benchmarks.load import preset
    from facetron.benchmarks.suite import Settings, run_sweeps, write_report

    result: dict = {"suite": {"mode": "test", "parts": ["load"]}, "pairs": {}}
    run_sweeps(triton.grpc_url, [preset("tokenizer")], Settings(concurrency=(1,), per_worker={"tokenizer": 3}),
               result, metrics_url=f"{triton.host}:{triton.metrics_port}")
    result["wall_s"] = 0.0
    scraped = result["server_metrics"]["tokenizer"]
    assert scraped["triton_models"]["tokenizer"]["requests"] >= 3
    files = write_report(result, "metrics-smoke", tmp_path)
    md = files[1].read_text()
    assert "## Server metrics (/metrics scraped before and after each sweep)" in md
    assert "| tokenizer | tokenizer |" in md
    assert json.loads(files[0].read_text())["server_metrics"]["tokenizer"]["triton_models"]
