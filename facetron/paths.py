"""Where facetron keeps generated artifacts (ONNX exports, caches)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Everything facetron builds in a checkout (repositories, users, prepared
#: photos) lives under one root, so every command agrees from any directory.
BUILD_DIR = Path(os.environ.get("FACETRON_BUILD_DIR") or REPO_ROOT / "build")
DEFAULT_REPOSITORY = BUILD_DIR / "model_repository"


def cache_dir(*parts: str) -> Path:
    """Cache folder for derived artifacts (e.g. face nets exported to ONNX).

    ``$FACETRON_CACHE`` if set, else ``~/.cache/facetron``. Created on demand.
    Contents are derived from installed weights and can be deleted any time.
    """
    root = Path(os.environ.get("FACETRON_CACHE") or Path.home() / ".cache" / "facetron")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
