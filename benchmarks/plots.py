"""PNG figures of a benchmark run (matplotlib, Agg backend: no display needed).

Every figure carries a footer with the machine, the git sha and the date,
also stored in the PNG's ``Description`` text chunk, so a picture taken out
of its folder still says where it came from.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path
from typing import Mapping, Sequence

from facetron.atomic import atomic_write_bytes

STAGE_COLORS = {"queue_ms": "#c44", "compute_input_ms": "#e94", "compute_infer_ms": "#2a7",
                "compute_output_ms": "#36c", "other_ms": "#999"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def footer_text(machine: Mapping) -> str:
    """One line: cpu/gpu, cores, git sha, key versions."""
    pk = machine.get("packages", {})
    device = machine.get("gpu") or machine.get("cpu", "?")
    return (f"{device}, {machine.get('cores', '?')} cores | git {machine.get('git', '?')} | "
            f"torch {pk.get('torch')} | onnxruntime {pk.get('onnxruntime')} | tritonclient {pk.get('tritonclient')}")


def _save(fig, path: Path, footer: str) -> Path:
    fig.text(0.01, 0.005, footer, fontsize=7, color="#555", ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Description": footer, "Software": "facetron.benchmarks"})
    _plt().close(fig)
    return atomic_write_bytes(Path(path), buf.getvalue())


def plot_latency(sweeps: Mapping[str, Sequence[Mapping]], path: Path, footer: str) -> Path:
    """Per load case: p50/p90/p95/p99 latency (left axis, log) and throughput (right) vs concurrency."""
    plt = _plt()
    n = max(1, len(sweeps))
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.8), squeeze=False)
    for ax, (name, rows) in zip(axes[0], sweeps.items()):
        conc = [r["concurrency"] for r in rows]
        any_ok = False
        for p, style in (("p50", "-o"), ("p90", "--s"), ("p95", ":^"), ("p99", "-.v")):
            vals = [r.get(f"{p}_ms") for r in rows]
            any_ok = any_ok or any(v is not None and v > 0 for v in vals)
            ax.plot(conc, [float("nan") if v is None else v for v in vals], style, label=p, markersize=4)
        ax.set_xscale("log", base=2)
        if any_ok:
            ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "no successful request", transform=ax.transAxes, ha="center", color="#c44")
        ax.set_xticks(conc, [str(c) for c in conc])
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("latency ms")
        errs = sum(r.get("errors", 0) for r in rows)
        ax.set_title(name + (f"  ({errs} errors)" if errs else ""), fontsize=10)
        tw = ax.twinx()
        tw.plot(conc, [r.get("throughput_rps") or 0 for r in rows], color="#888", alpha=0.6, marker=".", label="req/s")
        tw.set_ylabel("throughput req/s", color="#666")
        ax.legend(loc="upper left", fontsize=7)
    fig.suptitle("Triton over gRPC: latency percentiles vs concurrency (client side, warm-up excluded)", fontsize=11)
    return _save(fig, path, footer)


def plot_stages(stages: Mapping[str, Mapping[str, Mapping]], path: Path, footer: str) -> Path:
    """Stacked bars: ms per request in queue / compute input / infer / output / other, per model per case."""
    plt = _plt()
    labels, rows = [], []
    for case, models in stages.items():
        for model, row in models.items():
            if row.get("total_ms") is None:
                continue
            labels.append(f"{case}\n→ {model}" if case != model else model)
            rows.append(row)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels) + 2), 4.6))
    bottom = [0.0] * len(rows)
    for stage, color in STAGE_COLORS.items():
        vals = [float(r.get(stage) or 0.0) for r in rows]
        ax.bar(range(len(rows)), vals, bottom=bottom, color=color, label=stage.replace("_ms", ""))
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(range(len(rows)), labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("ms per request (server side)")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.legend(fontsize=8)
    ax.set_title("Stage breakdown from Triton's statistics API (BLS children under their own names)", fontsize=10)
    return _save(fig, path, footer)


def plot_ratios(ratios: Sequence[tuple[str, float]], path: Path, footer: str) -> Path:
    """Horizontal bars of A/B time ratios on a log axis; 1 = parity, < 1 = A faster."""
    plt = _plt()
    ratios = [(k, v) for k, v in ratios if v is not None and v > 0]
    fig, ax = plt.subplots(figsize=(8.5, 0.42 * len(ratios) + 1.6))
    ys = range(len(ratios))
    ax.barh(list(ys), [v for _, v in ratios], color=["#2a7" if v <= 1 else "#c72" for _, v in ratios])
    for y, (_, v) in zip(ys, ratios):
        ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
    ax.axvline(1.0, color="#333", lw=1)
    ax.set_xscale("log")
    ax.set_yticks(list(ys), [k for k, _ in ratios], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("time ratio A / B (p50; < 1: A faster)")
    ax.set_title("Side-by-side pairs, each measured interleaved in one run", fontsize=10)
    return _save(fig, path, footer)
