"""Values of a request as they arrive on the wire: one-element string and
scalar tensors decoded and checked, each error naming the input."""

from __future__ import annotations

from typing import Any

import numpy as np

from facetron.errors import InvalidInputError


def decode_utf8(item: Any, name: str) -> str:
    """One BYTES element as text; InvalidInputError naming ``name`` if not UTF-8."""
    if not isinstance(item, bytes):
        return str(item)
    try:
        return item.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(name, f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def one_string(arr: np.ndarray, name: str) -> str:
    """The single UTF-8 string of a one-element BYTES tensor."""
    if arr.size != 1:
        raise InvalidInputError(name, f"expected exactly one string, got shape {list(arr.shape)}")
    return decode_utf8(arr.reshape(-1)[0], name)


def one_scalar(arr: np.ndarray, name: str, dtype):
    """The single value of a one-element numeric tensor of ``dtype``."""
    if arr.dtype != np.dtype(dtype):
        raise InvalidInputError(name, f"expected dtype {np.dtype(dtype)}, got {arr.dtype}")
    if arr.size != 1:
        raise InvalidInputError(name, f"expected one value, got shape {list(arr.shape)}")
    return arr.reshape(-1)[0].item()
