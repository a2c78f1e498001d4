"""A diffusers component folder the operator supplies (a ControlNet, a tiny
autoencoder): checked to be the expected class and loaded from safetensors
weights on disk only, every refusal an InvalidInputError naming the flag."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from facetron.errors import InvalidInputError


def load_component(path: str | Path, cls, flag: str, example: str):
    """``cls`` (a diffusers ModelMixin class) from folder ``path``: its config.json must name
    ``cls``; weights safetensors only, never the network. ``example`` says what to give."""
    # 1. the folder: config.json naming the class
    name = cls.__name__
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise InvalidInputError(flag, f"{path} has no config.json: expected a diffusers {name} folder ({example})")
    try:
        class_name = json.loads(config_file.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as exc:
        raise InvalidInputError(flag, f"{config_file} is not a readable JSON config ({exc})") from None
    if class_name != name:
        raise InvalidInputError(flag, f"{path} holds a {class_name!r}, not a diffusers {name}")
    # 2. the weights (safetensors only, never the network)
    try:
        return cls.from_pretrained(path, use_safetensors=True, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise InvalidInputError(flag, f"cannot load {path} as a {name} with safetensors weights "
                                      f"({str(exc).splitlines()[0]})") from None


def weights_hash(path: str | Path) -> str:
    """16 hex digits of the SHA-256 over a folder's safetensors files (names and bytes, sorted)."""
    h = hashlib.sha256()
    for f in sorted(Path(path).glob("*.safetensors")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]
