"""Options several ``facetron`` commands share: one definition, one help
text, one set of choices (taken from :mod:`facetron.contract`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from facetron import contract
from facetron.paths import HOME_SHOWN, data_root

AUTO = "auto"
#: ``--cpu-runtime``: a served net's runtime, or measured per net on this machine
RUNTIME_CHOICES = (AUTO,) + contract.NET_RUNTIMES
#: ``--precision``: OpenVINO's inference precision, or chosen per net
PRECISION_CHOICES = contract.NET_PRECISIONS + (AUTO,)

USERS_DIR_HELP = f"user registry (default: $FACETRON_USERS_DIR, else {HOME_SHOWN}/users)"


def under_data_root(*parts: str) -> Path:
    """A default output path: under the data root (``$FACETRON_HOME``), never the checkout."""
    return data_root().joinpath(*parts)


def add_users_dir(p: argparse.ArgumentParser, help: str = USERS_DIR_HELP) -> None:
    p.add_argument("--users-dir", type=Path, default=None, help=help)


def add_runtime_precision(p: argparse.ArgumentParser, runtime_help: str, precision_help: str,
                          default: str | None) -> None:
    """``--cpu-runtime`` and ``--precision``, checked at parse time (choices from the contract)."""
    p.add_argument("--cpu-runtime", choices=RUNTIME_CHOICES, default=default, help=runtime_help)
    p.add_argument("--precision", choices=PRECISION_CHOICES, default=default, help=precision_help)
