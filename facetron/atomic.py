"""Atomic file writes: write to a temp file beside the target, then rename,
so a crash never leaves a half-written file under the final name."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from facetron.errors import InvalidInputError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented UTF-8 JSON atomically."""
    return atomic_write_bytes(path, json_bytes(obj))


def json_bytes(obj: Any) -> bytes:
    """``obj`` as the indented UTF-8 JSON facetron writes everywhere."""
    return (json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default) + "\n").encode("utf-8")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


#: Written into every folder :func:`atomic_dir` builds: facetron replaces a
#: folder only if it finds this marker (it made the folder) or the folder is empty.
ARTIFACT_MARKER = ".facetron-artifact"


def check_replaceable(path: str | os.PathLike, name: str | None = None) -> Path:
    """``path`` if facetron may build a folder there: absent, empty, or a
    folder facetron made (it holds :data:`ARTIFACT_MARKER`). Anything else is
    refused before any work, naming the path, so a user's files are never
    deleted or overwritten."""
    path = Path(path)
    label = f"{name} {path}" if name else str(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise InvalidInputError(label, "exists and is not a folder facetron made; choose a new or empty folder")
    if path.is_dir() and not (path / ARTIFACT_MARKER).is_file() and any(path.iterdir()):
        raise InvalidInputError(
            label, f"holds files facetron did not make (no {ARTIFACT_MARKER} marker): facetron never replaces "
                   "such a folder; choose a new or empty folder (nothing was changed)")
    return path


@contextmanager
def atomic_dir(path: str | os.PathLike, name: str | None = None) -> Iterator[Path]:
    """Build a folder under a temp name; on success replace ``path`` with it.

    ``path`` must be absent, empty or a folder facetron made (see
    :func:`check_replaceable`; checked before the caller's work starts). The
    old folder stays in place until the new one is complete, then is swapped
    out by renames and removed. On error the temp folder is removed and
    ``path`` is left as it was."""
    path = check_replaceable(path, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        (tmp / ARTIFACT_MARKER).write_text("made by facetron; this folder may be replaced by facetron\n")
        yield tmp
        check_replaceable(path, name)  # nothing foreign appeared while we worked
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
