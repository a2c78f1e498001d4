"""Tests act as their users the way an operator does: a registered user's token is issued
by the registry (only its hash kept there) and kept in the operator's token store, where the
client finds it (facetron.token_store; the store lives in the session sandbox, conftest)."""

from __future__ import annotations

from pathlib import Path

from facetron.token_store import issue_kept
from facetron.users import UserRegistry


def grant(registry: UserRegistry | Path | str, user: str) -> str:
    """Issue ``user``'s token and keep it in the token store; returns it."""
    registry = registry if isinstance(registry, UserRegistry) else UserRegistry(Path(registry))
    return issue_kept(registry, user)[0]
