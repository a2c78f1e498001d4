"""``facetron bench``: latency benchmarks (results in benchmarks/results/)."""

from __future__ import annotations

import argparse
import json


def _faces(args: argparse.Namespace) -> int:
    from facetron.benchmarks.faces import run

    result = run(repeats=args.repeats)
    print(json.dumps({k: result[k] for k in ("embedder", "pipeline", "triton", "written")}, indent=2))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="latency benchmarks (JSON + Markdown + PNG in benchmarks/results/)")
    bsub = p.add_subparsers(dest="bench_command", required=True, metavar="SUITE")
    f = bsub.add_parser("faces", help="embedder vs dlib-bin, face pipeline throughput, Triton vs in-process")
    f.add_argument("--repeats", type=int, default=20)
    f.set_defaults(func=_faces)
