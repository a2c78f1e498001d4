"""User registry: user id -> reference embedding, template face, LoRA.

The registry owns its folder layout: every other module asks it for a
user's files instead of building paths. A user's files change as one unit:
each change writes a complete new version folder beside the current one
and then switches the ``current`` link with one atomic rename, so a reader
never sees a half-registered user (a template without its trigger word, a
LoRA without its sidecar). Layout under the registry root::

    <root>/<user_id>/current -> v000003         # the served version (a symlink)
    <root>/<user_id>/v000003/user.json          # subject words, trigger token
    <root>/<user_id>/v000003/reference_embedding.npy   # float32 [1,128], L2-normalised
    <root>/<user_id>/v000003/template.png       # best-quality face photo (fusion source)
    <root>/<user_id>/v000003/template.json      # its 5 landmarks
    <root>/<user_id>/v000003/lora.safetensors   # identity LoRA (diffusers/peft format)
    <root>/<user_id>/v000003/lora.json          # the LoRA's sidecar (trigger token, training)
    <root>/<user_id>/token.sha256               # SHA-256 of the user's secret token (not versioned)

The version (``v000003``) keys every cache of a user's state (the runtime
LoRA bank), so a retrained user is served on the next request and a deleted
one is gone. Writers of one user are serialised by a lock file; the two
newest versions are kept so a request that resolved the previous one can
finish reading it.

Each caller acts only as its own user: a served registry
(``require_tokens``, :func:`served_registry`) answers for a user only when the
request carries that user's secret token (:meth:`UserRegistry.issue_token`;
only its SHA-256 is kept here). A missing or wrong token gets the same
NOT_FOUND as an unknown user, so a stranger cannot tell which ids exist.

User ids come from requests: they are validated against a strict pattern
before any path is built from them, so ``../`` and friends never reach the
file system.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import io
import json
import os
import re
import secrets
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from facetron.atomic import json_bytes
from facetron.contract import USER_ID_PATTERN, USER_TOKENS_ENV, validate_user_id
from facetron.errors import InvalidInputError, NotFoundError
from facetron.imageio import load_image
from facetron.paths import data_root

EMBEDDING_FILE = "reference_embedding.npy"
USER_INFO_FILE = "user.json"
TEMPLATE_IMAGE = "template.png"
TEMPLATE_LANDMARKS = "template.json"
LORA_FILE = "lora.safetensors"
LORA_INFO_FILE = "lora.json"
DEFAULT_TRIGGER = "<facetron-user>"
DEFAULT_SUBJECT = "a person"
CURRENT = "current"
LOCK_FILE = ".lock"
TOKEN_FILE = "token.sha256"
KEEP_VERSIONS = 2
VERSION_GRACE_S = 300.0  # an older version stays this long, for requests that resolved it before a switch
_VERSION = re.compile(r"v(\d{6})")

#: what a change installs: file name -> bytes, or a path to copy
Changes = Mapping[str, "bytes | Path"]


def default_root() -> Path:
    """``$FACETRON_USERS_DIR``, else ``users/`` under the data root (:func:`facetron.paths.data_root`), read at call time."""
    return Path(os.environ.get("FACETRON_USERS_DIR") or data_root() / "users")


def registry_at(users_dir: str | os.PathLike | None, require_tokens: bool = False) -> "UserRegistry":
    """The registry at ``users_dir`` ("" or None = the default root)."""
    return UserRegistry(Path(users_dir) if users_dir else default_root(), require_tokens)


def tokens_required() -> bool:
    """Do served models check per-user tokens? Yes unless ``$FACETRON_USER_TOKENS`` is ``off``
    (`facetron serve --no-user-tokens`: single-user local use)."""
    return os.environ.get(USER_TOKENS_ENV, "").strip().lower() != "off"


def served_registry(users_dir: str | os.PathLike | None) -> "UserRegistry":
    """The registry a served model reads: a user only with its token (unless turned off)."""
    return registry_at(users_dir, require_tokens=tokens_required())


def unknown_user(user_id: str) -> NotFoundError:
    """The one answer for an unknown user and for a missing or wrong token (no server path in it)."""
    return NotFoundError(f"user_id: unknown user {user_id!r}")


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def embedding_bytes(embedding: np.ndarray) -> bytes:
    """A reference embedding as .npy bytes, float32 [1, D], L2-normalised."""
    emb = np.asarray(embedding, dtype=np.float32).reshape(1, -1)
    emb = emb / max(float(np.linalg.norm(emb)), 1e-12)
    buf = io.BytesIO()
    np.save(buf, emb, allow_pickle=False)
    return buf.getvalue()


@dataclass(frozen=True)
class UserRegistry:
    root: Path
    require_tokens: bool = False  # served: every read of a user needs its token (check_token)

    # --- layout -------------------------------------------------------------------------

    def user_dir(self, user_id: str) -> Path:
        """The user's folder (its versions live inside; read files through :meth:`files`)."""
        return Path(self.root) / validate_user_id(user_id)

    def version(self, user_id: str) -> str | None:
        """The served version's name (``v000003``), None for an unknown user."""
        link = self.user_dir(user_id) / CURRENT
        try:
            name = os.readlink(link)
        except OSError:
            return None
        return name if _VERSION.fullmatch(name) and (link.parent / name).is_dir() else None

    def files(self, user_id: str) -> Path | None:
        """The served version's folder (all of one user's files come from one version)."""
        v = self.version(user_id)
        return None if v is None else self.user_dir(user_id) / v

    def exists(self, user_id: str) -> bool:
        d = self.files(user_id)
        return d is not None and (d / EMBEDDING_FILE).is_file()

    def users(self) -> list[str]:
        root = Path(self.root)
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if USER_ID_PATTERN.fullmatch(p.name) and self.exists(p.name))

    # --- changes: one new version per change ----------------------------------------------

    @contextmanager
    def _locked(self, user_id: str) -> Iterator[Path]:
        udir = self.user_dir(user_id)
        udir.mkdir(parents=True, exist_ok=True)
        with open(udir / LOCK_FILE, "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield udir
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def update(self, user_id: str, changes: Changes) -> str:
        """Install ``changes`` (file name -> bytes or a path to copy) as a new
        version holding the current files plus the changes; switch to it
        atomically. Returns the new version's name."""
        with self._locked(user_id) as udir:
            current = self.files(user_id)
            work = Path(tempfile.mkdtemp(prefix=".new-", dir=udir))
            try:
                if current is not None:
                    for f in current.iterdir():
                        if f.is_file() and f.name not in changes:
                            _link_or_copy(f, work / f.name)
                for name, value in changes.items():
                    if "/" in name or name.startswith("."):
                        raise ValueError(f"not a plain file name: {name!r}")
                    if isinstance(value, (bytes, bytearray)):
                        (work / name).write_bytes(value)
                    else:
                        shutil.copyfile(value, work / name)
                    os.chmod(work / name, 0o644)
                os.chmod(work, 0o755)
                version = self._next_version(udir)
                os.rename(work, udir / version)
            except BaseException:
                shutil.rmtree(work, ignore_errors=True)
                raise
            link = udir / f".{CURRENT}-{uuid.uuid4().hex}"
            os.symlink(version, link)
            os.replace(link, udir / CURRENT)
            self._drop_old_versions(udir, keep=version)
            return version

    @staticmethod
    def _next_version(udir: Path) -> str:
        numbers = [int(m.group(1)) for p in udir.iterdir() if (m := _VERSION.fullmatch(p.name))]
        return f"v{max(numbers, default=0) + 1:06d}"

    @staticmethod
    def _drop_old_versions(udir: Path, keep: str) -> None:
        """Remove versions older than the newest KEEP_VERSIONS once they were
        replaced more than VERSION_GRACE_S ago (readers resolve a version, then read it)."""
        versions = sorted(p.name for p in udir.iterdir() if _VERSION.fullmatch(p.name))
        now = time.time()
        for older, newer in zip(versions[:-KEEP_VERSIONS], versions[1:]):
            if older != keep and now - (udir / newer).stat().st_mtime > VERSION_GRACE_S:
                shutil.rmtree(udir / older, ignore_errors=True)

    def delete(self, user_id: str) -> bool:
        """Remove a user and all its versions (False if there was none)."""
        udir = self.user_dir(user_id)
        if not udir.is_dir():
            return False
        with self._locked(user_id):
            gone = Path(tempfile.mkdtemp(prefix=f".deleted-{user_id}-", dir=self.root))
            os.replace(udir, gone / user_id)
        shutil.rmtree(gone, ignore_errors=True)
        return True

    def purge(self, user_id: str) -> list[Path]:
        """Remove every trace of a user in this registry: its folder with every version (the
        older ones kept for :data:`VERSION_GRACE_S` included) and any ``.deleted-<user>-*`` folder
        an interrupted :meth:`delete` left. Returns the paths removed; an OSError if one could not
        be removed (nothing is ignored: a purge must say when it left something)."""
        removed = []
        udir = self.user_dir(user_id)
        if udir.is_dir() and not udir.is_symlink():
            with self._locked(user_id):
                gone = Path(tempfile.mkdtemp(prefix=f".deleted-{user_id}-", dir=self.root))
                os.replace(udir, gone / user_id)
            shutil.rmtree(gone)
            removed.append(udir)
        leftover = re.compile(rf"\.deleted-{re.escape(user_id)}-[a-z0-9_]+")  # mkdtemp's names: no '-'
        root = Path(self.root)
        for p in sorted(root.iterdir()) if root.is_dir() else []:
            if leftover.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
                removed.append(p)
        return removed

    # --- per-user tokens: the caller must hold the user's secret ----------------------------

    def issue_token(self, user_id: str) -> str:
        """A new secret token for a registered user (the old one stops working at once);
        only its SHA-256 is stored. Returns the token: it cannot be read back later."""
        if not self.exists(user_id):
            raise unknown_user(user_id)
        token = secrets.token_urlsafe(32)
        with self._locked(user_id) as udir:
            tmp = udir / f".{TOKEN_FILE}-{uuid.uuid4().hex}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(token_digest(token) + "\n")
            os.replace(tmp, udir / TOKEN_FILE)
        return token

    def revoke_token(self, user_id: str) -> bool:
        """Remove the user's token (no request acts as the user until a new one is issued)."""
        path = self.user_dir(user_id) / TOKEN_FILE
        with self._locked(user_id):
            try:
                path.unlink()
            except FileNotFoundError:
                return False
        return True

    def has_token(self, user_id: str) -> bool:
        return (self.user_dir(user_id) / TOKEN_FILE).is_file()

    def check_token(self, user_id: str, token: str | None) -> None:
        """Does ``token`` act as ``user_id``? Nothing to check unless ``require_tokens``;
        a missing or wrong token, or a user without one: :func:`unknown_user`."""
        if not self.require_tokens:
            return
        try:
            stored = (self.user_dir(user_id) / TOKEN_FILE).read_text().strip()
        except OSError:
            raise unknown_user(user_id) from None
        if not token or not hmac.compare_digest(stored, token_digest(token)):
            raise unknown_user(user_id)

    # --- what the user holds -----------------------------------------------------------------

    def save_reference_embedding(self, user_id: str, embedding: np.ndarray) -> str:
        return self.update(user_id, {EMBEDDING_FILE: embedding_bytes(embedding)})

    def install_lora(self, user_id: str, lora: Path, sidecar: Path | None = None) -> str:
        """A trained LoRA (+ its JSON sidecar) as one new version."""
        changes: dict[str, bytes | Path] = {LORA_FILE: Path(lora)}
        if sidecar is not None and Path(sidecar).is_file():
            changes[LORA_INFO_FILE] = Path(sidecar)
        return self.update(user_id, changes)

    def register(self, user_id: str, reference_embedding: np.ndarray, template_image: Path,
                 template_landmarks: Path, info: dict) -> str:
        """Put a prepared user into the registry as one version: reference
        embedding, template face (fusion source) and ``user.json``."""
        return self.update(user_id, {
            EMBEDDING_FILE: embedding_bytes(reference_embedding),
            TEMPLATE_IMAGE: Path(template_image),
            TEMPLATE_LANDMARKS: Path(template_landmarks),
            USER_INFO_FILE: json_bytes(info),
        })

    # --- what the serving side reads: one user at one version ----------------------------

    def pin(self, user_id: str, token: str | None = None) -> "PinnedUser":
        """The user at its served version, resolved once: every read of a request comes
        from this one version folder (a retrain during the request switches nothing).
        The id is validated here, once; NotFoundError for an unknown user or, on a served
        registry, a missing or wrong ``token`` (the same message)."""
        d = self.files(user_id)
        if d is None or not (d / EMBEDDING_FILE).is_file():
            raise unknown_user(user_id)  # no server path in a served message
        self.check_token(user_id, token)
        return PinnedUser(user_id, d.name, d, token)

    def at_version(self, user_id: str, version: str) -> "PinnedUser":
        """The user at ``version`` (one a request pinned earlier; kept KEEP_VERSIONS /
        VERSION_GRACE_S after a switch); NotFoundError when that version is gone. No token
        check here: the served model's door checked the caller (:meth:`check_token`)."""
        if not _VERSION.fullmatch(version):
            raise InvalidInputError("user_version", f"{version!r} is not a registry version (v + 6 digits)")
        d = self.user_dir(user_id) / version
        if not (d / EMBEDDING_FILE).is_file():
            raise NotFoundError(f"user_id: user {user_id!r} has no version {version} (retrained or deleted since)")
        return PinnedUser(user_id, version, d)

    def require(self, user_id: str) -> Path:
        """The served version's folder; NotFoundError naming the registry for an unknown user."""
        return self.pin(user_id).folder

    def reference_embedding(self, user_id: str, token: str | None = None) -> np.ndarray:
        """float32 [1, D] L2-normalised; NotFoundError for an unknown user (or a wrong token, served)."""
        return self.pin(user_id, token).reference_embedding()

    def identity_text(self, user_id: str) -> tuple[str, str]:
        """(trigger token, subject words) for prompts; ('' = base model) gives generic words."""
        return self.pin(user_id).identity_text() if user_id else (DEFAULT_SUBJECT, DEFAULT_SUBJECT)

    def template(self, user_id: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(template face image, its 5 landmarks) written at registration, if any."""
        d = self.files(user_id)
        return None if d is None else PinnedUser(user_id, d.name, d).template()

    def lora_path(self, user_id: str) -> Path:
        """The served version's LoRA file; NotFoundError when there is none."""
        d = self.files(user_id)
        if d is None:
            raise NotFoundError(f"user_id: no trained LoRA for user {user_id!r}")
        return PinnedUser(user_id, d.name, d).lora_path()

    def describe(self, user_id: str) -> dict:
        """What `facetron users show` prints: version, files and their sizes, identity text."""
        d = self.require(user_id)
        trigger, subject = self.identity_text(user_id)
        return {
            "user_id": user_id,
            "version": d.name,
            "folder": str(d),
            "files": {f.name: f.stat().st_size for f in sorted(d.iterdir()) if f.is_file()},
            "trigger_token": trigger,
            "subject": subject,
            "has_lora": (d / LORA_FILE).is_file(),
            "has_template": (d / TEMPLATE_IMAGE).is_file(),
        }


@dataclass(frozen=True)
class PinnedUser:
    """One user at one registry version (:meth:`UserRegistry.pin`): the files a
    request reads, all from ``folder``, with no further lookup or validation."""

    user_id: str
    version: str  # v000003
    folder: Path
    token: str | None = field(default=None, repr=False)  # the caller's token, passed on to the nets it calls

    def reference_embedding(self) -> np.ndarray:
        """float32 [1, D] L2-normalised."""
        emb = np.load(self.folder / EMBEDDING_FILE, allow_pickle=False).astype(np.float32).reshape(1, -1)
        return emb / max(float(np.linalg.norm(emb)), 1e-12)

    def identity_text(self) -> tuple[str, str]:
        """(trigger token, subject words) for prompts."""
        trigger, subject = DEFAULT_TRIGGER, DEFAULT_SUBJECT
        for name in (LORA_INFO_FILE, USER_INFO_FILE):
            if (self.folder / name).is_file():
                meta = json.loads((self.folder / name).read_text())
                trigger = meta.get("trigger_token", trigger)
                subject = meta.get("subject", subject)
        return trigger, subject

    def template(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(template face image, its 5 landmarks) written at registration, if any."""
        if not ((self.folder / TEMPLATE_IMAGE).is_file() and (self.folder / TEMPLATE_LANDMARKS).is_file()):
            return None
        landmarks = json.loads((self.folder / TEMPLATE_LANDMARKS).read_text())["landmarks"]
        return load_image(self.folder / TEMPLATE_IMAGE), np.asarray(landmarks, np.float32)

    def lora_path(self) -> Path:
        """This version's LoRA file; NotFoundError when there is none."""
        path = self.folder / LORA_FILE
        if not path.is_file():
            raise NotFoundError(f"user_id: no trained LoRA for user {self.user_id!r} ({LORA_FILE} missing in "
                                f"version {self.version})")
        return path


def _link_or_copy(src: Path, dst: Path) -> None:
    """Carry an unchanged file into the new version (hard link: no copy of a large LoRA)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
