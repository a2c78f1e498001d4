"""``facetron assets``: which shipped weights/data facetron uses, and their licences."""

from __future__ import annotations

import argparse

from facetron.assets import asset_licence, asset_names, asset_path
from facetron.errors import AssetMissingError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("assets", help="list weights and data files found in installed packages")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    missing = 0
    for name in asset_names():
        try:
            where = str(asset_path(name))
        except AssetMissingError as exc:
            where, missing = f"MISSING ({exc})", missing + 1
        print(f"{name:18s} {asset_licence(name):45s} {where}")
    return 1 if missing else 0
