"""The web app's login: salted password hashes in a credentials file.

One line per login, ``user_id:scrypt$<n>$<r>$<p>$<salt hex>$<hash hex>``;
blank lines and ``#`` comments are ignored. The user id is a facetron user
id (the page acts only as that user); the password is never stored, only
its scrypt hash with a random 16-byte salt. Add or replace a login with
``facetron web --add-login USER --credentials FILE`` (the password is read
from stdin or asked twice on a terminal), or by hand::

    python -c "from facetron.web.auth import hash_password as h; print('alice:' + h(input()))" >> FILE

A file with any malformed line is refused whole, naming the line: a typo
never silently drops a login. Failed logins of one user id are throttled
(:data:`MAX_FAILED_LOGINS` within :data:`FAILED_LOGIN_WINDOW_S`), which
bounds password guessing at the cost of one scrypt per try.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from pathlib import Path
from typing import Callable

from facetron.atomic import atomic_write_bytes
from facetron.contract import validate_user_id
from facetron.errors import InvalidInputError

#: scrypt cost: 2**14 x 8 = 16 MiB and ~50 ms per check on this machine's cores (OWASP's minimum for scrypt)
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
SALT_BYTES, HASH_BYTES = 16, 32
#: shortest password accepted by --add-login (NIST SP 800-63B's minimum for user-chosen secrets)
MIN_PASSWORD_CHARS = 8
#: failed logins of one user id allowed within the window; then that id is refused until the window passes
MAX_FAILED_LOGINS = 5
FAILED_LOGIN_WINDOW_S = 60.0
#: environment variable naming the credentials file when --credentials is not given
CREDENTIALS_ENV = "FACETRON_WEB_CREDENTIALS"
_SCHEME = "scrypt"


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=HASH_BYTES,
                          maxmem=2 * 128 * n * r * p + (1 << 20))


def hash_password(password: str) -> str:
    """``scrypt$n$r$p$salt$hash`` of ``password`` with a fresh random salt."""
    if not password:
        raise InvalidInputError("password", "is empty")
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return f"{_SCHEME}${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def _parse_hash(stored: str, where: str) -> tuple[int, int, int, bytes, bytes]:
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != _SCHEME:
        raise InvalidInputError(where, "is not 'user_id:scrypt$n$r$p$salt$hash' (plain-text passwords are refused: "
                                       "add logins with `facetron web --add-login USER`)")
    try:
        n, r, p = (int(v) for v in parts[1:4])
        salt, digest = bytes.fromhex(parts[4]), bytes.fromhex(parts[5])
    except ValueError:
        raise InvalidInputError(where, "has a malformed scrypt hash (n, r, p integers; salt and hash in hex)") from None
    if n < 2 or n & (n - 1) or not (1 <= r <= 64 and 1 <= p <= 16 and n * r <= 2**22) or len(salt) < 8 \
            or len(digest) != HASH_BYTES:
        raise InvalidInputError(where, "has scrypt parameters out of range")
    return n, r, p, salt, digest


def verify_password(password: str, stored: str) -> bool:
    """True when ``password`` matches the stored hash (constant-time compare)."""
    n, r, p, salt, digest = _parse_hash(stored, "stored hash")
    return hmac.compare_digest(_scrypt(password or "", salt, n, r, p), digest)


def load_credentials(path: Path) -> dict[str, str]:
    """user id -> stored hash, from a credentials file; refused whole on any malformed line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInputError("--credentials", f"{path}: cannot be read ({exc.strerror or exc})") from None
    logins: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"--credentials line {number}"
        user, sep, stored = line.partition(":")
        if not sep:
            raise InvalidInputError(where, "is not 'user_id:scrypt$n$r$p$salt$hash'")
        user = validate_user_id(user.strip(), where)
        _parse_hash(stored.strip(), where)
        if user in logins:
            raise InvalidInputError(where, f"repeats the login {user!r}")
        logins[user] = stored.strip()
    if not logins:
        raise InvalidInputError("--credentials", f"{path}: has no logins (add one with `facetron web --add-login USER`)")
    return logins


def set_login(path: Path, user_id: str, password: str) -> Path:
    """Add or replace ``user_id``'s login in the credentials file (written to a temp file, then renamed; mode 0600)."""
    user = validate_user_id(user_id, "--add-login")
    if len(password) < MIN_PASSWORD_CHARS:
        raise InvalidInputError("password", f"has {len(password)} characters; at least {MIN_PASSWORD_CHARS} needed")
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    if lines:
        load_credentials(path)  # never rewrite a file we cannot read whole
    kept = [ln for ln in lines if ln.partition(":")[0].strip() != user]
    kept.append(f"{user}:{hash_password(password)}")
    atomic_write_bytes(path, ("\n".join(kept) + "\n").encode("utf-8"), mode=0o600)  # hashes only, owner-readable
    return path


class Authenticator:
    """Gradio's ``auth`` callable over a credentials table, with failed-login throttling per user id."""

    def __init__(self, logins: dict[str, str], clock: Callable[[], float] = time.monotonic):
        self._logins = dict(logins)
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()
        self._clock = clock
        # an unknown id costs the same scrypt as a known one (no timing hint of which ids exist)
        self._dummy = hash_password(secrets.token_hex(8))

    @property
    def users(self) -> tuple[str, ...]:
        return tuple(sorted(self._logins))

    def throttled(self, user_id: str) -> bool:
        now = self._clock()
        with self._lock:
            recent = [t for t in self._failures.get(user_id, []) if now - t < FAILED_LOGIN_WINDOW_S]
            if recent:
                self._failures[user_id] = recent
            else:
                self._failures.pop(user_id, None)  # the table holds only ids with recent failures
            return len(recent) >= MAX_FAILED_LOGINS

    def __call__(self, username: str, password: str) -> bool:
        user = (username or "").strip()
        if self.throttled(user):
            return False
        ok = verify_password(password or "", self._logins.get(user, self._dummy)) and user in self._logins
        if not ok:
            with self._lock:
                self._failures.setdefault(user, []).append(self._clock())
        return ok
