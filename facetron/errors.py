"""facetron's error types.

Every error names the offending input and the rule it broke, so the CLI can
print it as one line and the Triton models can return it as INVALID_ARG /
NOT_FOUND over gRPC.
"""

from __future__ import annotations

import re


class FacetronError(Exception):
    """Base class: a user-facing error with a one-line message."""

    #: gRPC-style status name the serving layer maps this error to.
    status = "INTERNAL"


class InvalidInputError(FacetronError, ValueError):
    """An input broke a rule (shape, dtype, range, file format...)."""

    status = "INVALID_ARGUMENT"

    def __init__(self, name: str, rule: str):
        self.input_name = name
        self.rule = rule
        super().__init__(f"{name}: {rule}")

    @classmethod
    def from_message(cls, message: str) -> "InvalidInputError":
        """Rebuild from a server's ``"name: rule"`` message."""
        name, _, rule = message.partition(":")
        return cls(name.strip(), rule.strip()) if rule else cls("input", message)


class NotFoundError(FacetronError, LookupError):
    """A named thing (user, model, file) does not exist."""

    status = "NOT_FOUND"


class AssetMissingError(FacetronError, FileNotFoundError):
    """A weight/data file that ships in an installed package is absent."""

    status = "FAILED_PRECONDITION"


class ServerError(FacetronError, RuntimeError):
    """tritonserver could not be started, or failed while running."""

    status = "UNAVAILABLE"


class CancelledError(FacetronError):
    """The client gave up on a request (the server stops its work between steps)."""

    status = "CANCELLED"


# Errors that cross a BLS hop or a decoupled stream lose their gRPC status in
# Triton's python backend (2.51); facetron's models append it to the message.
_STATUS_TAG = re.compile(r" \[status: ([A-Z_]+)\]$")


def tag_status(message: str, status: str) -> str:
    """``message [status: NOT_FOUND]`` (idempotent)."""
    return message if _STATUS_TAG.search(message) else f"{message} [status: {status}]"


def split_status(message: str) -> tuple[str | None, str]:
    """(status or None, message without the tag)."""
    m = _STATUS_TAG.search(message)
    return (m.group(1), message[: m.start()]) if m else (None, message)


#: The one status <-> error mapping: gRPC status name -> (facetron error class,
#: Triton python-backend ``TritonError`` code name). Statuses not listed are
#: plain FacetronErrors answered as INTERNAL.
STATUS_TABLE: dict[str, tuple[type[FacetronError], str]] = {
    "INVALID_ARGUMENT": (InvalidInputError, "INVALID_ARG"),
    "NOT_FOUND": (NotFoundError, "NOT_FOUND"),
    "UNAVAILABLE": (ServerError, "UNAVAILABLE"),
    "CANCELLED": (CancelledError, "CANCELLED"),
}


def triton_code_name(status: str | None) -> str:
    """The ``pb_utils.TritonError`` code name that answers ``status``."""
    return STATUS_TABLE[status][1] if status in STATUS_TABLE else "INTERNAL"


def error_for_status(status: str | None, message: str) -> "FacetronError":
    """The facetron error for a status name and a server's message
    (``"name: rule"`` for INVALID_ARGUMENT)."""
    if status == "INVALID_ARGUMENT":
        return InvalidInputError.from_message(message)
    if status in STATUS_TABLE:
        return STATUS_TABLE[status][0](message)
    err = FacetronError(message)
    err.status = status or "INTERNAL"
    return err
