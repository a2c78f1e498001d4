"""Where facetron keeps what it makes (repositories, users, prepared photos,
outputs) and what it derives (caches).

The data root never depends on where the checkout is: ``$FACETRON_HOME`` if
set, else ``$XDG_DATA_HOME/facetron``, else ``~/.local/share/facetron``
(:func:`data_root`). The Makefile sets ``FACETRON_HOME=build`` so ``make
demo`` / ``make serve`` write under the checkout's ``build/`` as before.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
HOME_ENV = "FACETRON_HOME"
#: the older name of ``FACETRON_HOME``, still read when ``FACETRON_HOME`` is unset
LEGACY_HOME_ENV = "FACETRON_BUILD_DIR"
#: how help texts write the data root
HOME_SHOWN = "$" + HOME_ENV


def _xdg(variable: str, fallback: Path) -> Path:
    """An XDG base folder: the variable when it holds an absolute path (the spec ignores others), else fallback."""
    value = os.environ.get(variable, "")
    return Path(value) if value and os.path.isabs(value) else fallback


def data_root() -> Path:
    """Everything facetron builds (repositories, users, prepared photos, outputs) lives under one root, so every
    command agrees from any directory: ``$FACETRON_HOME``, else ``$XDG_DATA_HOME/facetron``, else
    ``~/.local/share/facetron``. Read at each call (not created here)."""
    env = os.environ.get(HOME_ENV) or os.environ.get(LEGACY_HOME_ENV)
    if env:
        return Path(env).expanduser()
    return _xdg("XDG_DATA_HOME", Path.home() / ".local" / "share") / "facetron"


#: the data root when facetron was imported (for existing importers; call data_root() for the current one)
BUILD_DIR = data_root()
DEFAULT_REPOSITORY = BUILD_DIR / "model_repository"


def shown(path: Path | str) -> str:
    """``path`` as help texts show it: under the data root as ``$FACETRON_HOME/...``, under the checkout relative
    to it, else as it is (a default is never printed as an absolute path into the checkout)."""
    path = Path(path)
    for root, prefix in ((data_root(), HOME_SHOWN), (REPO_ROOT, "")):
        try:
            rel = path.relative_to(root)
        except ValueError:
            continue
        if rel == Path("."):
            return prefix or "."
        return f"{prefix}/{rel.as_posix()}" if prefix else rel.as_posix()
    return str(path)


def cache_dir(*parts: str) -> Path:
    """Cache folder for derived artifacts (e.g. face nets exported to ONNX).

    ``$FACETRON_CACHE`` if set, else ``$XDG_CACHE_HOME/facetron``, else
    ``~/.cache/facetron``. Created on demand. Contents are derived from
    installed weights and can be deleted any time.
    """
    root = Path(os.environ.get("FACETRON_CACHE") or _xdg("XDG_CACHE_HOME", Path.home() / ".cache") / "facetron")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
