"""User registry: user id -> reference embedding, template face, LoRA.

Layout under the registry root (one folder per user)::

    <root>/<user_id>/user.json                 # metadata (trigger token, base model hash, ...)
    <root>/<user_id>/reference_embedding.npy   # float32 [1,128], L2-normalised
    <root>/<user_id>/template.png              # best-quality face photo (fusion source)
    <root>/<user_id>/lora.safetensors          # identity LoRA (diffusers/peft format)

User ids come from requests: they are validated against a strict pattern
before any path is built from them, so ``../`` and friends never reach the
file system.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facetron.atomic import atomic_write_bytes
from facetron.errors import InvalidInputError, NotFoundError

USER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
EMBEDDING_FILE = "reference_embedding.npy"


def validate_user_id(user_id: str, name: str = "user_id") -> str:
    """Return ``user_id`` if it is 1-64 chars of [A-Za-z0-9_-] starting alphanumeric."""
    if not isinstance(user_id, str) or not USER_ID_RE.match(user_id):
        raise InvalidInputError(
            name, f"{user_id!r} is not a valid user id (1-64 characters from A-Z a-z 0-9 _ -, starting alphanumeric)"
        )
    return user_id


def default_root() -> Path:
    from facetron.paths import REPO_ROOT

    return Path(os.environ.get("FACETRON_USERS_DIR") or REPO_ROOT / "build" / "users")


@dataclass(frozen=True)
class UserRegistry:
    root: Path

    def user_dir(self, user_id: str) -> Path:
        return Path(self.root) / validate_user_id(user_id)

    def exists(self, user_id: str) -> bool:
        return (self.user_dir(user_id) / EMBEDDING_FILE).is_file()

    def reference_embedding(self, user_id: str) -> np.ndarray:
        """float32 [1, D] L2-normalised; NotFoundError for an unknown user."""
        path = self.user_dir(user_id) / EMBEDDING_FILE
        if not path.is_file():
            raise NotFoundError(f"user_id: unknown user {user_id!r} (no {EMBEDDING_FILE} in {self.root})")
        emb = np.load(path, allow_pickle=False).astype(np.float32).reshape(1, -1)
        return emb / max(float(np.linalg.norm(emb)), 1e-12)

    def save_reference_embedding(self, user_id: str, embedding: np.ndarray) -> Path:
        import io

        emb = np.asarray(embedding, dtype=np.float32).reshape(1, -1)
        emb = emb / max(float(np.linalg.norm(emb)), 1e-12)
        buf = io.BytesIO()
        np.save(buf, emb, allow_pickle=False)
        return atomic_write_bytes(self.user_dir(user_id) / EMBEDDING_FILE, buf.getvalue())

    def install_file(self, user_id: str, src: Path, name: str) -> Path:
        """Copy ``src`` into the user's folder as ``name``, atomically."""
        import shutil

        dst = self.user_dir(user_id) / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.tmp")
        shutil.copyfile(src, tmp)
        tmp.replace(dst)
        return dst

    def install_lora(self, user_id: str, lora: Path, sidecar: Path | None = None) -> Path:
        """Copy a trained LoRA (+ its JSON sidecar) into the user's folder, atomically."""
        if sidecar is not None and Path(sidecar).is_file():
            self.install_file(user_id, Path(sidecar), "lora.json")
        return self.install_file(user_id, Path(lora), "lora.safetensors")

    def save_user_info(self, user_id: str, info: dict) -> Path:
        """``user.json``: what captions/prompts say about the user (e.g. subject words)."""
        from facetron.atomic import atomic_write_json

        return atomic_write_json(self.user_dir(user_id) / "user.json", info)

    def users(self) -> list[str]:
        root = Path(self.root)
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if USER_ID_RE.match(p.name) and (p / EMBEDDING_FILE).is_file())
