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


@contextmanager
def atomic_file(path: str | os.PathLike, mode: int = 0o644) -> Iterator[Path]:
    """A temp path beside ``path`` to write; renamed to ``path`` with ``mode`` when the block ends
    (removed if it raises). 0o644 by default: outputs are meant to be read by others."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_file(path, mode) as tmp:
        tmp.write_bytes(data)
    return Path(path)


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


# --- ownership of single files and of what facetron may delete -------------------------

#: A single file cannot hold :data:`ARTIFACT_MARKER`: facetron marks a file it writes with a
#: JSON sidecar ``<stem>.json`` that names the file under this key (a LoRA's sidecar does).
SIDECAR_NAMES_KEY = "lora_file"
#: Every JSON file facetron writes as its own record holds this key (sidecars, reports).
FACETRON_JSON_KEY = "facetron_version"
_MAX_SIDECAR_BYTES = 1 << 20


def owned_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder facetron made (holds :data:`ARTIFACT_MARKER`; a symlink never is)."""
    path = Path(path)
    return path.is_dir() and not path.is_symlink() and (path / ARTIFACT_MARKER).is_file()


def facetron_json(path: str | os.PathLike) -> dict | None:
    """``path`` as a JSON object facetron wrote (it records :data:`FACETRON_JSON_KEY`), else None."""
    path = Path(path)
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > _MAX_SIDECAR_BYTES:
            return None
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and FACETRON_JSON_KEY in doc else None


def owned_file(path: str | os.PathLike) -> bool:
    """Whether facetron wrote the single file ``path``: a facetron JSON record itself, or the file its
    sidecar ``<stem>.json`` (a facetron JSON record) names under :data:`SIDECAR_NAMES_KEY`."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return False
    if path.suffix == ".json" and facetron_json(path) is not None:
        return True
    sidecar = facetron_json(path.with_suffix(".json"))
    return sidecar is not None and sidecar.get(SIDECAR_NAMES_KEY) == path.name


def check_file_replaceable(path: str | os.PathLike, name: str | None = None) -> Path:
    """``path`` if facetron may write a file there: absent, or a file facetron wrote
    (:func:`owned_file`). Anything else is refused before any work, naming the path and the rule."""
    path = Path(path)
    label = f"{name} {path}" if name else str(path)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise InvalidInputError(label, "exists and is not a file facetron wrote; choose another output")
    if path.exists() and not owned_file(path):
        raise InvalidInputError(
            label, f"exists and facetron did not write it (no {path.with_suffix('.json').name} sidecar of facetron's "
                   f"naming it): facetron never overwrites such a file; move it away or choose another output "
                   "(nothing was changed)")
    return path


def remove_tree(path: str | os.PathLike) -> None:
    """Remove a file or folder, raising on failure (a removal that must not leave anything behind)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
