"""numpy arrays on the wire: Triton dtypes, tritonclient inputs and requested
outputs, and the checks of the tensors a client builds (shared by the
requests, shared memory and the portrait stream)."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import tritonclient.grpc as grpcclient

from facetron.errors import InvalidInputError
from facetron.request import bytes_tensor, number, scalar  # noqa: F401 - the wire encoders, one copy


def triton_dtype(array: np.ndarray) -> str:
    if array.dtype == object or array.dtype.kind in ("S", "U"):
        return "BYTES"
    return grpcclient.np_to_triton_dtype(array.dtype)


def as_wire_array(array: np.ndarray) -> np.ndarray:
    """numpy array as tritonclient sends it (str arrays become UTF-8 bytes objects)."""
    array = np.asarray(array)
    if array.dtype.kind == "U":
        return np.vectorize(lambda s: s.encode("utf-8"), otypes=[object])(array) if array.size else array.astype(object)
    return array


def infer_inputs(inputs: Mapping[str, np.ndarray]) -> list[grpcclient.InferInput]:
    """tritonclient InferInputs holding ``inputs`` (sent in the gRPC message)."""
    tensors = []
    for name, array in inputs.items():
        array = as_wire_array(array)
        tensor = grpcclient.InferInput(name, list(array.shape), triton_dtype(array))
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def requested_outputs(outputs: Sequence[str]) -> list[grpcclient.InferRequestedOutput]:
    return [grpcclient.InferRequestedOutput(n) for n in outputs]


def rgb_images(images: np.ndarray, name: str, ndim: int = 4) -> np.ndarray:
    """RGB uint8 images ``[N, H, W, 3]`` (one ``[H, W, 3]`` becomes a batch of
    one), or one image ``[H, W, 3]`` with ``ndim=3``; contiguous."""
    images = np.asarray(images)
    if ndim == 4 and images.ndim == 3:
        images = images[None]
    if images.dtype != np.uint8:
        raise InvalidInputError(name, f"expected dtype uint8 (RGB), got {images.dtype}")
    if images.ndim != ndim or images.shape[-1] != 3:
        want = "[N, H, W, 3]" if ndim == 4 else "[H, W, 3]"
        raise InvalidInputError(name, f"expected shape {want} (RGB), got {list(images.shape)}")
    if images.size == 0:
        raise InvalidInputError(name, f"is empty (shape {list(images.shape)})")
    return np.ascontiguousarray(images)
