"""A failed gRPC call as a facetron error.

The status -> error class mapping is :mod:`facetron.errors`'
(``error_for_status`` / ``STATUS_TABLE``); this module adds only what a
client sees and a model does not:

* the message loses Triton's ``[request id: ...]`` prefix and facetron's
  `` [status: X]`` tag (:func:`facetron.errors.split_status`); the tag
  gives the status when the gRPC one was lost (a BLS hop, a stream);
* INVALID_ARGUMENT names the input: facetron models say ``name: rule``,
  Triton core says ``... input 'name' ...`` (:func:`invalid_input`);
* a server that cannot serve *now* is UNAVAILABLE however it says so:
  NOT_FOUND "... has no available versions" (a model it unloaded),
  INTERNAL "... Server not ready" (a BLS call into a stopping server);
  so it is retried and failed over, never a bad input or a missing model;
* DEADLINE_EXCEEDED is a ServerError naming the timeout;
* UNAVAILABLE and unknown failures name the server's url.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

from tritonclient.utils import InferenceServerException

from facetron.errors import FacetronError, InvalidInputError, ServerError, error_for_status, split_status

_REQUEST_ID = re.compile(r"^\[request id: [^\]]*\]\s*")
_NAME_RULE = re.compile(r"^([A-Za-z_][\w.\[\]-]*): (.+)$", re.S)
_CORE_INPUT = re.compile(r"input '([^']+)'")
_NOT_READY_STATUS = ("NOT_FOUND", "INTERNAL", "UNKNOWN")
_NOT_READY_MESSAGES = ("has no available versions", "Server not ready", "Server is stopping")
_UNKNOWN_MODEL_MESSAGES = ("unknown model", "is not found")
_LOST_STATUS = ("", "UNKNOWN", "INTERNAL")  # a status tag in the message says more
_NAMES_THE_SERVER = ("UNAVAILABLE", "UNKNOWN", "CANCELLED", "")  # the message does not say which server


def status_name(exc: InferenceServerException) -> str:
    """The gRPC status of a tritonclient exception (``"INVALID_ARGUMENT"``; ``""`` if none)."""
    return str(exc.status() or "").replace("StatusCode.", "")


def invalid_input(message: str) -> InvalidInputError:
    """InvalidInputError from a server message: facetron models say "name: rule";
    Triton core says "... input 'name' ..." (then the whole message is the rule)."""
    message = _REQUEST_ID.sub("", message)
    m = _NAME_RULE.match(message)
    if m:
        return InvalidInputError(m.group(1), m.group(2))
    m = _CORE_INPUT.search(message)
    return InvalidInputError(m.group(1) if m else "input", message)


def client_status(status: str, message: str) -> str:
    """The status a client acts on (see the module doc)."""
    if status == "UNAVAILABLE" or (status in _NOT_READY_STATUS and any(m in message for m in _NOT_READY_MESSAGES)):
        return "UNAVAILABLE"
    if not status and any(m in message for m in _UNKNOWN_MODEL_MESSAGES):
        return "NOT_FOUND"
    return status


def error_from(status: str, message: str, url: str, timeout_s: float | None = None) -> FacetronError:
    """The facetron error for a gRPC status name and a server message from ``url``."""
    tagged, message = split_status(_REQUEST_ID.sub("", message))
    if tagged and status in _LOST_STATUS:
        status = tagged
    status = client_status(status, message)
    err: FacetronError
    if status == "INVALID_ARGUMENT":
        err = invalid_input(message)
    elif status == "DEADLINE_EXCEEDED":
        limit = f" of {timeout_s:g} s" if timeout_s is not None else ""
        err = ServerError(f"{url}: no answer within the timeout{limit} ({message})")
        err.status = "DEADLINE_EXCEEDED"
    else:
        err = error_for_status(status or None, f"{url}: {message}" if status in _NAMES_THE_SERVER else message)
    err.url = url  # type: ignore[attr-defined]
    return err


def translate_error(exc: InferenceServerException, url: str, timeout_s: float | None = None) -> FacetronError:
    """The facetron error for a failed gRPC call to ``url``.

    INVALID_ARGUMENT -> InvalidInputError, NOT_FOUND -> NotFoundError,
    UNAVAILABLE / DEADLINE_EXCEEDED -> ServerError (``status`` tells which);
    other statuses -> FacetronError with that ``status``."""
    return error_from(status_name(exc), exc.message() or str(exc), url, timeout_s)


def is_unavailable(err: BaseException) -> bool:
    """True for errors where another try (later, or on another server) may work."""
    return isinstance(err, FacetronError) and getattr(err, "status", None) == "UNAVAILABLE"


def gave_up(err: FacetronError, attempts: int) -> FacetronError:
    """``err`` with a note of how many attempts were made (when more than one)."""
    if attempts <= 1 or not is_unavailable(err):
        return err
    new = ServerError(f"{err} (gave up after {attempts} attempts)")
    new.status = getattr(err, "status", "UNAVAILABLE")
    new.url = getattr(err, "url", None)  # type: ignore[attr-defined]
    return new


def no_server(urls: Sequence[str], errors: Mapping[str, str], tries: int) -> ServerError:
    """A pool's final error: every server and its last error."""
    detail = "; ".join(errors.get(u, f"{u}: not tried") for u in urls)
    err = ServerError(f"no server could serve the call ({tries} tries over {len(urls)} servers): {detail}")
    err.status = "UNAVAILABLE"
    return err
