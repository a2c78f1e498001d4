"""Soak: many clients for a while against one server; nothing may break or grow.

``facetron bench soak`` (issue 13's acceptance): C asyncio clients for S
seconds send a mix of ``portrait`` (tiny model, few steps), ``face_select``
and ``face_detector`` calls through facetron's own async client; a few
portrait calls are given a deadline far shorter than a generation, so the
client gives up (DEADLINE_EXCEEDED) and the server must stop that work
between denoising steps. Reported: calls per model, errors by kind
(``unexpected`` must be 0), latency percentiles, and the server's RSS
(tritonserver + python stubs) sampled every second: growth after warm-up.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facetron.benchmarks.load import preset
from facetron.benchmarks.report import markdown_table, write_result
from facetron.benchmarks.suite import BENCH_USER, BUILD_DIR, bench_server
from facetron.client import AsyncFacetronClient
from facetron.errors import FacetronError
from facetron.rss_monitor import group_rss_bytes

MIX = (("portrait", 0.2), ("face_select", 0.3), ("face_detector", 0.5))
CANCEL_SHARE = 0.1  # of portrait calls: a deadline far below a generation's time
CANCEL_DEADLINE_S = 0.05


@dataclass
class Tally:
    calls: dict[str, int] = field(default_factory=dict)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)

    def ok(self, model: str, seconds: float) -> None:
        self.calls[model] = self.calls.get(model, 0) + 1
        self.latencies.setdefault(model, []).append(seconds)

    def error(self, kind: str, message: str, expected: bool) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if not expected and len(self.unexpected) < 20:
            self.unexpected.append(message[:300])


def group_rss_mb(pid: int) -> float:
    """RSS of the server and its python-backend stubs (its descendants), MB."""
    return group_rss_bytes(pid) / 2**20


async def _client_loop(url: str, cases: dict, deadline: float, tally: Tally, rng: random.Random) -> None:
    models, weights = zip(*MIX)
    async with AsyncFacetronClient(url, timeout_s=300) as client:
        while time.monotonic() < deadline:
            model = rng.choices(models, weights)[0]
            case = cases[model]
            cancel = model == "portrait" and rng.random() < CANCEL_SHARE
            t0 = time.perf_counter()
            try:
                await client.infer(model, case.inputs, case.outputs, timeout_s=CANCEL_DEADLINE_S if cancel else 300)
                tally.ok(model, time.perf_counter() - t0)
            except FacetronError as exc:
                status = getattr(exc, "status", "INTERNAL")
                expected = cancel and status == "DEADLINE_EXCEEDED"
                tally.error(f"{model} {status}" + (" (cancelled on purpose)" if expected else ""), str(exc), expected)


async def _run(url: str, pid: int, clients: int, seconds: float, warmup_s: float, seed: int) -> dict:
    cases = {m: preset(m, steps=2, user_id=BENCH_USER) for m, _ in MIX}
    tally, rss = Tally(), []
    start = time.monotonic()
    deadline = start + seconds

    async def sample() -> None:
        while time.monotonic() < deadline:
            rss.append((round(time.monotonic() - start, 1), round(group_rss_mb(pid), 1)))
            await asyncio.sleep(1.0)

    loops = [_client_loop(url, cases, deadline, tally, random.Random(seed + i)) for i in range(clients)]
    await asyncio.gather(sample(), *loops)
    warm = [mb for t, mb in rss if t >= warmup_s]
    return {
        "clients": clients, "seconds": seconds, "warmup_s": warmup_s,
        "calls": tally.calls, "errors": tally.errors, "unexpected_errors": len(tally.unexpected),
        "unexpected_examples": tally.unexpected,
        "latency_ms": {m: {"p50": round(float(np.percentile(v, 50)) * 1e3, 1),
                           "p95": round(float(np.percentile(v, 95)) * 1e3, 1)} for m, v in tally.latencies.items()},
        "rss_mb": rss,
        "rss_growth_after_warmup": round(warm[-1] / warm[0] - 1, 4) if len(warm) >= 2 else None,
    }


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, mb = zip(*result["rss_mb"]) if result["rss_mb"] else ((), ())
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot(t, mb, marker=".")
    ax.axvline(result["warmup_s"], color="grey", linestyle="--", label="end of warm-up")
    ax.set_xlabel("seconds")
    ax.set_ylabel("server RSS (MB)")
    ax.set_title(f"soak: {result['clients']} clients, {sum(result['calls'].values())} calls, "
                 f"{result['unexpected_errors']} unexpected errors")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def render(result: dict) -> str:
    rows = [{"model": m, "calls": n, **result["latency_ms"].get(m, {})} for m, n in sorted(result["calls"].items())]
    errors = [{"kind": k, "count": n} for k, n in sorted(result["errors"].items())]
    growth = result["rss_growth_after_warmup"]
    return (
        f"{result['clients']} clients x {result['seconds']:g} s, mixed portrait (tiny, 2 steps; "
        f"{CANCEL_SHARE:.0%} cancelled on purpose by a {CANCEL_DEADLINE_S * 1e3:g} ms deadline) / face_select / "
        f"face_detector.\n\n**Unexpected errors: {result['unexpected_errors']}**; server RSS growth after "
        f"{result['warmup_s']:g} s warm-up: **{growth:+.1%}**.\n\n"
        + markdown_table(rows, ["model", "calls", "p50", "p95"]) + "\n"
        + (markdown_table(errors, ["kind", "count"]) if errors else "No errors.\n")
        + "\n![RSS](" + result.get("figure", "") + ")\n"
    )


def run_soak(clients: int = 16, seconds: float = 60.0, warmup_s: float = 10.0, seed: int = 0,
             build_dir: Path = BUILD_DIR) -> tuple[dict, Path]:
    with bench_server(build_dir) as (server, info):
        if "portrait" not in info.get("served", []):
            raise FacetronError(f"soak: portrait is not served ({info.get('load_errors')})")
        result = asyncio.run(_run(server.grpc_url, server.process.pid, clients, seconds, warmup_s, seed))
    result["server"] = {k: info[k] for k in ("served", "load_errors") if k in info}
    json_path = write_result("soak", result, "")
    figure = plot(result, json_path.with_suffix(".png"))
    result["figure"] = figure.name
    json_path = write_result("soak", result, render(result))
    return result, json_path
