"""System shared memory for large tensors (``infer(..., use_shm=True)``).

Instead of copying a large batch into the gRPC message, the client writes
each input into its own POSIX shared-memory region (``/dev/shm``), registers
the region with Triton and sends only the region's name; outputs given a
size bound come back the same way.

Works only against a server on this machine that sees the same
``/dev/shm`` (same host, not a container with its own ``/dev/shm``); the
clients refuse a non-loopback url. Regions live for one call: they are
registered per attempt, unregistered in a ``finally`` (Triton may hold a
region a moment after answering; names it still holds are retried on the
client's next shared-memory call and on ``close()``), and destroyed when the
call ends — on error too — and at interpreter exit for any a crash left.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import os
import threading
import time
import uuid
import weakref
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterable, Iterator, Mapping, Sequence

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException, serialize_byte_tensor, triton_to_np_dtype

from facetron.client.connection import require_local
from facetron.client.tensors import as_wire_array, triton_dtype
from facetron.errors import InvalidInputError, ServerError

# tritonclient's shared_memory keeps a module-level dict of handles: guard it.
_LOCK = threading.Lock()
_LIVE: "weakref.WeakSet[ShmTensors]" = weakref.WeakSet()
_COUNTER = itertools.count()


@dataclass
class Region:
    name: str  # the name Triton knows the region by
    key: str  # the POSIX shm key (/dev/shm/<key>)
    byte_size: int
    handle: Any


def _create(tag: str, byte_size: int) -> Region:
    name = f"facetron_{os.getpid()}_{next(_COUNTER)}_{uuid.uuid4().hex[:8]}_{tag}"
    try:
        with _LOCK:
            handle = shm.create_shared_memory_region(name, f"/{name}", max(int(byte_size), 1), create_only=True)
    except shm.SharedMemoryException as exc:
        raise ServerError(f"shared memory: cannot create a {byte_size}-byte region for {tag!r}: {exc.__cause__ or exc}") from None
    return Region(name, f"/{name}", max(int(byte_size), 1), handle)


class ShmTensors:
    """The shared-memory regions of one request: inputs written at creation,
    outputs (those with a byte bound) read by :meth:`read_outputs`."""

    def __init__(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        output_bytes: int | Mapping[str, int] | None = None,
    ):
        self.inputs: list[tuple[str, Region, list[int], str]] = []
        self.outputs: dict[str, Region] = {}
        self.output_names = list(outputs)
        self._closed = False
        _LIVE.add(self)
        try:
            for name, array in inputs.items():
                array = as_wire_array(array)
                dtype = triton_dtype(array)
                data = serialize_byte_tensor(array) if dtype == "BYTES" else np.ascontiguousarray(array)
                size = len(data.item()) if dtype == "BYTES" else data.nbytes
                region = _create(name, size)
                shm.set_shared_memory_region(region.handle, [data])
                self.inputs.append((name, region, list(array.shape), dtype))
            if isinstance(output_bytes, int):
                output_bytes = {n: output_bytes for n in self.output_names}
            for name, size in (output_bytes or {}).items():
                if name not in self.output_names:
                    raise InvalidInputError("shm_output_bytes", f"{name!r} is not a requested output")
                if int(size) < 1:
                    raise InvalidInputError("shm_output_bytes", f"{name!r}: size must be >= 1 byte, got {size}")
                self.outputs[name] = _create(name, int(size))
        except BaseException:
            self.close()
            raise

    @property
    def regions(self) -> list[Region]:
        return [r for _, r, _, _ in self.inputs] + list(self.outputs.values())

    def infer_inputs(self) -> list[grpcclient.InferInput]:
        out = []
        for name, region, shape, dtype in self.inputs:
            tensor = grpcclient.InferInput(name, shape, dtype)
            tensor.set_shared_memory(region.name, region.byte_size)
            out.append(tensor)
        return out

    def requested_outputs(self) -> list[grpcclient.InferRequestedOutput]:
        out = []
        for name in self.output_names:
            req = grpcclient.InferRequestedOutput(name)
            if name in self.outputs:
                req.set_shared_memory(self.outputs[name].name, self.outputs[name].byte_size)
            out.append(req)
        return out

    def read_outputs(self, result: Any) -> dict[str, np.ndarray]:
        """Outputs as numpy arrays (copied out of shared memory)."""
        out = {}
        for name in self.output_names:
            if name not in self.outputs:
                out[name] = result.as_numpy(name)
                continue
            meta = result.get_output(name)
            dtype = triton_to_np_dtype(meta.datatype)
            view = shm.get_contents_as_numpy(self.outputs[name].handle, dtype, list(meta.shape))
            out[name] = np.array(view, copy=True)
        return out

    def close(self) -> None:
        """Destroy every region (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for region in self.regions:
            try:
                with _LOCK:
                    shm.destroy_shared_memory_region(region.handle)
            except Exception:  # already gone: nothing left to free
                pass
        _LIVE.discard(self)

    def __enter__(self) -> "ShmTensors":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def shm_tensors(
    url: str,
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str],
    use_shm: bool,
    output_bytes: int | Mapping[str, int] | None = None,
) -> AbstractContextManager[ShmTensors | None]:
    """The regions of one call when ``use_shm`` (``url`` must be a loopback
    address), else nothing; closed when the ``with`` block ends."""
    if not use_shm:
        return nullcontext()
    require_local(url)
    return ShmTensors(inputs, outputs, output_bytes)


@atexit.register
def _close_all() -> None:
    for tensors in list(_LIVE):
        tensors.close()


# Triton releases a request's shm inputs a moment after its response is sent;
# until then unregistering answers "currently in use": try again, briefly.
UNREGISTER_WAIT_S = 2.0


def _in_use(exc: InferenceServerException) -> bool:
    return "currently in use" in (exc.message() or "")


# twin: shm.unregister_async
def unregister(client: grpcclient.InferenceServerClient, names: Iterable[str], timeout_s: float | None,
               headers: dict[str, str] | None = None) -> list[str]:
    """Unregister ``names`` from the server; return those it still refused."""
    left = []
    for name in names:
        delay, deadline = 0.002, time.monotonic() + UNREGISTER_WAIT_S
        while True:
            try:
                client.unregister_system_shared_memory(name, headers=headers, client_timeout=timeout_s)
                break
            except InferenceServerException as exc:
                if not _in_use(exc) or time.monotonic() > deadline:
                    if _in_use(exc):
                        left.append(name)
                    break  # other errors: the server is gone, and its mapping with it
                time.sleep(delay)
                delay = min(delay * 2, 0.1)
    return left


# twin: shm.unregister
async def unregister_async(client: Any, names: Iterable[str], timeout_s: float | None,
                           headers: dict[str, str] | None = None) -> list[str]:
    """:func:`unregister` for ``tritonclient.grpc.aio`` clients."""
    left = []
    for name in names:
        delay, deadline = 0.002, time.monotonic() + UNREGISTER_WAIT_S
        while True:
            try:
                await client.unregister_system_shared_memory(name, headers=headers, client_timeout=timeout_s)
                break
            except InferenceServerException as exc:
                if not _in_use(exc) or time.monotonic() > deadline:
                    if _in_use(exc):
                        left.append(name)
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.1)
    return left


# twin: shm.registered_async
@contextmanager
def registered(
    client: grpcclient.InferenceServerClient, tensors: ShmTensors, timeout_s: float | None, pending: set[str],
    headers: dict[str, str] | None = None,
) -> Iterator[None]:
    """Register ``tensors``' regions with the server for the block; unregister
    after. Names the server still holds (in use past the wait) go to
    ``pending``, which the caller retries on its next call and on close."""
    done: list[str] = []
    try:
        if pending:
            stale = set(pending)
            pending.difference_update(stale)
            pending.update(unregister(client, stale, timeout_s, headers))
        for region in tensors.regions:
            client.register_system_shared_memory(region.name, region.key, region.byte_size, headers=headers,
                                                 client_timeout=timeout_s)
            done.append(region.name)
        yield
    finally:
        pending.update(unregister(client, done, timeout_s, headers))


# twin: shm.registered
@asynccontextmanager
async def registered_async(client: Any, tensors: ShmTensors, timeout_s: float | None, pending: set[str],
                           headers: dict[str, str] | None = None) -> AsyncIterator[None]:
    """:func:`registered` for ``tritonclient.grpc.aio`` clients."""
    done: list[str] = []
    try:
        if pending:
            stale = set(pending)
            pending.difference_update(stale)
            pending.update(await unregister_async(client, stale, timeout_s, headers))
        for region in tensors.regions:
            await client.register_system_shared_memory(region.name, region.key, region.byte_size, headers=headers,
                                                       client_timeout=timeout_s)
            done.append(region.name)
        yield
    finally:
        pending.update(await unregister_async(client, done, timeout_s, headers))


def leftover_regions() -> list[str]:
    """facetron regions of this process still mapped (for tests: should be empty)."""
    with _LOCK:
        return [k for k in shm.mapped_shared_memory_regions() if k.startswith(f"/facetron_{os.getpid()}_")]
