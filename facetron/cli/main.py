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
from facetron.cli.conventions import (HelpFormatter, add_global_options, apply_global_options, end_with_parent,
                                      installed_version, is_leaf, walk)
from facetron.errors import FacetronError
from facetron.paths import HOME_ENV, LEGACY_HOME_ENV

# Each module defines add_parser(subparsers); heavy parts (torch, diffusers)
# are imported inside the command functions so `facetron --help` stays fast.
COMMAND_MODULES = (serve, tokenize, demo, assets, faces, bench, train, export, generate, users, web, styles, evaluate)

EXIT_ERROR = 2
DATA_ROOT_NOTE = (f"Data root (repositories, users, prepared photos, outputs): ${HOME_ENV} if set "
                  f"(${LEGACY_HOME_ENV}, its older name, otherwise), else $XDG_DATA_HOME/facetron, else "
                  "~/.local/share/facetron; defaults shown as $FACETRON_HOME/... are under it.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="facetron",
        description="Personalized portraits (FaceChain recipe) served by NVIDIA Triton.",
        epilog=DATA_ROOT_NOTE,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {installed_version()}",
                        help="print the installed facetron version and exit")
    add_global_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.add_parser(sub)
    for _path, p in walk(parser):
        p.formatter_class = HelpFormatter
        if p is not parser and is_leaf(p):
            add_global_options(p, top=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    end_with_parent()  # a stage of the web app ends with it
    parser = build_parser()
    args = parser.parse_args(argv)
    apply_global_options(args)
    try:
        return int(args.func(args) or 0)
    except FacetronError as exc:
        print(f"facetron {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"facetron {args.command}: interrupted", file=sys.stderr)
        return 130

