"""The caller's side of per-user tokens: the raw secrets an operator holds.

The server keeps only each token's SHA-256 (:mod:`facetron.users`); whoever
issues a token (``facetron users token``, the first registration of a user)
gets it once and keeps it here, one file per user readable by this OS user
only: ``$FACETRON_TOKENS_DIR/<user_id>``, else ``<data root>/tokens/<user_id>``.
The client library, the demo and the web app read a user's token from here
when the caller gives none. Files are written to a temp name and renamed.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from facetron.contract import TOKENS_DIR_ENV, validate_user_id
from facetron.paths import data_root


def tokens_dir() -> Path:
    """``$FACETRON_TOKENS_DIR``, else ``tokens/`` under the data root (read at each call)."""
    return Path(os.environ.get(TOKENS_DIR_ENV) or data_root() / "tokens")


@dataclass(frozen=True)
class TokenStore:
    folder: Path = field(default_factory=tokens_dir)

    def path(self, user_id: str) -> Path:
        return Path(self.folder) / validate_user_id(user_id)

    def get(self, user_id: str) -> str | None:
        """The user's token, None when this store has none."""
        try:
            return self.path(user_id).read_text().strip() or None
        except OSError:
            return None

    def put(self, user_id: str, token: str) -> Path:
        """Keep ``token`` as the user's (mode 0600, replacing the one kept before)."""
        path = self.path(user_id)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
        os.replace(tmp, path)
        return path

    def remove(self, user_id: str) -> bool:
        try:
            self.path(user_id).unlink()
        except FileNotFoundError:
            return False
        return True


def issue_kept(registry, user_id: str, store: TokenStore | None = None, *, reuse: bool = False) -> tuple[str, Path]:
    """(token, its file): a new token issued by ``registry`` (a :class:`facetron.users.UserRegistry`, which
    keeps its hash) and kept in ``store`` (default: this machine's). ``reuse``: the token already kept is
    returned instead when the registry has one for the user (a benchmark acting again as its user)."""
    store = store if store is not None else TokenStore()
    kept = store.get(user_id) if reuse else None
    if kept is not None and registry.has_token(user_id):
        return kept, store.path(user_id)
    token = registry.issue_token(user_id)
    return token, store.put(user_id, token)
