"""``facetron`` console command: one entry point, subcommands per part.

Each subcommand lives in the module that does the work and registers itself
through ``add_parser(subparsers)``; this file only wires them together and
turns facetron errors into one clear line and a non-zero exit.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from facetron.errors import FacetronError

# (module, description) — each module defines add_parser(subparsers).
COMMAND_MODULES: tuple[str, ...] = (
    "facetron.commands.serve",
    "facetron.commands.tokenize",
    "facetron.commands.demo",
    "facetron.commands.assets",
    "facetron.commands.faces",
    "facetron.commands.bench",
    "facetron.commands.train",
    "facetron.commands.export",
    "facetron.commands.generate",
)

EXIT_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="facetron",
        description="Personalized portraits (FaceChain recipe) served by NVIDIA Triton.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
