"""User registry: user id -> reference embedding, template face, LoRA.

The registry owns its folder layout: every other module asks it for a
user's files instead of building paths. Layout under the registry root
(one folder per user)::

    <root>/<user_id>/user.json                 # subject words, trigger token
    <root>/<user_id>/reference_embedding.npy   # float32 [1,128], L2-normalised
    <root>/<user_id>/template.png              # best-quality face photo (fusion source)
    <root>/<user_id>/template.json             # its 5 landmarks
    <root>/<user_id>/lora.safetensors          # identity LoRA (diffusers/peft format)
    <root>/<user_id>/lora.json                 # the LoRA's sidecar (trigger token, training)

User ids come from requests: they are validated against a strict pattern
before any path is built from them, so ``../`` and friends never reach the
file system.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facetron.atomic import atomic_write_bytes, atomic_write_json
from facetron.contract import USER_ID_PATTERN, validate_user_id
from facetron.errors import NotFoundError
from facetron.imageio import load_image
from facetron.paths import BUILD_DIR

EMBEDDING_FILE = "reference_embedding.npy"
USER_INFO_FILE = "user.json"
TEMPLATE_IMAGE = "template.png"
TEMPLATE_LANDMARKS = "template.json"
LORA_FILE = "lora.safetensors"
LORA_INFO_FILE = "lora.json"
DEFAULT_TRIGGER = "<facetron-user>"
DEFAULT_SUBJECT = "a person"


def default_root() -> Path:
    """``$FACETRON_USERS_DIR``, else ``build/users`` under the checkout (any working directory)."""
    return Path(os.environ.get("FACETRON_USERS_DIR") or BUILD_DIR / "users")


def registry_at(users_dir: str | os.PathLike | None) -> "UserRegistry":
    """The registry at ``users_dir`` ("" or None = the default root)."""
    return UserRegistry(Path(users_dir) if users_dir else default_root())


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
        emb = np.asarray(embedding, dtype=np.float32).reshape(1, -1)
        emb = emb / max(float(np.linalg.norm(emb)), 1e-12)
        buf = io.BytesIO()
        np.save(buf, emb, allow_pickle=False)
        return atomic_write_bytes(self.user_dir(user_id) / EMBEDDING_FILE, buf.getvalue())

    def install_file(self, user_id: str, src: Path, name: str) -> Path:
        """Copy ``src`` into the user's folder as ``name``, atomically."""
        dst = self.user_dir(user_id) / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.tmp")
        shutil.copyfile(src, tmp)
        tmp.replace(dst)
        return dst

    def install_lora(self, user_id: str, lora: Path, sidecar: Path | None = None) -> Path:
        """Copy a trained LoRA (+ its JSON sidecar) into the user's folder, atomically."""
        if sidecar is not None and Path(sidecar).is_file():
            self.install_file(user_id, Path(sidecar), LORA_INFO_FILE)
        return self.install_file(user_id, Path(lora), LORA_FILE)

    def save_user_info(self, user_id: str, info: dict) -> Path:
        """``user.json``: what captions/prompts say about the user (e.g. subject words)."""
        return atomic_write_json(self.user_dir(user_id) / USER_INFO_FILE, info)

    def register(self, user_id: str, reference_embedding: np.ndarray, template_image: Path,
                 template_landmarks: Path, info: dict) -> None:
        """Put a prepared user into the registry: reference embedding, template
        face (fusion source) and ``user.json`` (subject words, trigger token)."""
        self.save_reference_embedding(user_id, reference_embedding)
        self.install_file(user_id, Path(template_image), TEMPLATE_IMAGE)
        self.install_file(user_id, Path(template_landmarks), TEMPLATE_LANDMARKS)
        self.save_user_info(user_id, info)

    # --- what the serving side reads ------------------------------------------------

    def require(self, user_id: str) -> Path:
        """The user's folder; NotFoundError naming the registry for an unknown user."""
        if not self.exists(user_id):
            raise NotFoundError(f"user_id: unknown user {user_id!r} (not registered in {self.root})")
        return self.user_dir(user_id)

    def identity_text(self, user_id: str) -> tuple[str, str]:
        """(trigger token, subject words) for prompts; ('' = base model) gives generic words."""
        if not user_id:
            return DEFAULT_SUBJECT, DEFAULT_SUBJECT
        udir = self.require(user_id)
        trigger, subject = DEFAULT_TRIGGER, DEFAULT_SUBJECT
        for name in (LORA_INFO_FILE, USER_INFO_FILE):
            path = udir / name
            if path.is_file():
                meta = json.loads(path.read_text())
                trigger = meta.get("trigger_token", trigger)
                subject = meta.get("subject", subject)
        return trigger, subject

    def template(self, user_id: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(template face image, its 5 landmarks) written at registration, if any."""
        udir = self.user_dir(user_id)
        img, meta = udir / TEMPLATE_IMAGE, udir / TEMPLATE_LANDMARKS
        if not (img.is_file() and meta.is_file()):
            return None
        return load_image(img), np.asarray(json.loads(meta.read_text())["landmarks"], np.float32)

    def lora_path(self, user_id: str) -> Path:
        """The user's trained LoRA file; NotFoundError when there is none."""
        path = self.user_dir(user_id) / LORA_FILE
        if not path.is_file():
            raise NotFoundError(f"user_id: no trained LoRA for user {user_id!r} ({LORA_FILE} missing in {self.root})")
        return path

    def users(self) -> list[str]:
        root = Path(self.root)
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if USER_ID_PATTERN.fullmatch(p.name) and (p / EMBEDDING_FILE).is_file())
