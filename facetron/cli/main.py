"""``facetron`` console command: one entry point, subcommands per part.

Each subcommand group is a module of :mod:`facetron.cli` that registers
itself through ``add_parser(subparsers)``; this file only wires them
together and turns facetron errors into one clear line and a non-zero exit.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from facetron.cli import assets, bench, demo, export, faces, generate, serve, tokenize, train, users, web
from facetron.cli import evaluate, styles
from facetron.errors import FacetronError

# Each module defines add_parser(subparsers); heavy parts (torch, diffusers)
# are imported inside the command functions so `facetron --help` stays fast.
COMMAND_MODULES = (serve, tokenize, demo, assets, faces, bench, train, export, generate, users, web, styles, evaluate)

EXIT_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="facetron",
        description="Personalized portraits (FaceChain recipe) served by NVIDIA Triton.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FacetronError as exc:
        print(f"facetron {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"facetron {args.command}: interrupted", file=sys.stderr)
        return 130

