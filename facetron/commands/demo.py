"""``facetron demo``: the README's main job, end to end on the embedded default.

Stages run in order and each is timed into ``<out>/report.json``. Today the
chain is: start tritonserver on loopback -> tokenize the portrait prompt
over gRPC -> write the report -> stop the server. Later stages (prepare
photos, train the LoRA, export, generate + select) are added here as they
land, so this stays the one main-job entry point.
"""

from __future__ import annotations

import argparse
import platform
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from facetron import __version__
from facetron.atomic import atomic_write_json
from facetron.client import FacetronClient
from facetron.paths import REPO_ROOT
from facetron.triton_server import TritonServer

DEFAULT_PROMPT = "a photo of <facetron-user>, a smiling person, studio portrait, soft light"


class StageTimer:
    """Collects wall-clock seconds per named stage."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        print(f"[demo] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = round(time.perf_counter() - t0, 4)
            print(f"[demo] {name}: {self.stages[name]:.2f} s", flush=True)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main job end to end on the embedded default")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "outputs" / "demo", help="output folder")
    p.add_argument("--repo", type=Path, default=REPO_ROOT / "model_repository")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    timer = StageTimer()
    report: dict = {
        "facetron_version": __version__,
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "note": (
            "Stages implemented so far: Triton serving + CLIP tokenizer over gRPC. "
            "Photo preparation, LoRA training, export and portrait generation are "
            "added to this same command as they land."
        ),
    }
    t_all = time.perf_counter()
    with timer.stage("start_triton"):
        server = TritonServer(args.repo, log_path=out / "tritonserver.log").start()
    try:
        with timer.stage("tokenize_grpc"):
            with FacetronClient(server.grpc_url) as client:
                ids = client.tokenize([args.prompt])[0].tolist()
        report["server"] = {"grpc": server.grpc_url, "log": str(server.log_path)}
        report["prompt"] = args.prompt
        report["input_ids"] = ids[: ids.index(49407) + 1]
    finally:
        with timer.stage("stop_triton"):
            server.stop()
    report["timings_s"] = dict(timer.stages, total=round(time.perf_counter() - t_all, 4))
    path = atomic_write_json(out / "report.json", report)
    print(f"[demo] prompt tokens: {report['input_ids']}")
    print(f"[demo] report written to {path}")
    return 0
