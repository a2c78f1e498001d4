"""Reading python-backend requests into net feeds and running a dynamic
batch as one call: the request side of the net models (``vae_*``,
``unet``, ``text_encoder``, ``unet_user_<id>``).

The requests of a dynamic batch are concatenated along the batch axis, run
once in the net's runtime (ONNX Runtime or OpenVINO: the ``runtime``
parameter, :mod:`facetron.net_runtimes`), and split back; a request that
breaks a rule gets its own error response."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from facetron import contract
from facetron.contract import ModelContract, NetParams
from facetron.errors import InvalidInputError
from facetron.net_runtimes import DEFAULT_ORT_MEMORY, open_runtime
from facetron.pipeline.net_io import (
    NET_BUDGETS,
    NET_CHECKS,
    check_feed,
    check_finite,
    check_sample,
)
from facetron.request import decode_utf8
from facetron.triton.backend import (
    error_response,
    get_input,
    pb,
    read_params,
    response,
    version_dir,
)


def item_strings(request, name: str, n: int) -> list[str]:
    """A per-item BYTES input ([N,1]) as N strings; absent = N empty strings."""
    t = pb().get_input_tensor_by_name(request, name)
    if t is None:
        return [""] * n
    arr = t.as_numpy().reshape(-1)
    if arr.shape[0] != n:
        raise InvalidInputError(name, f"expected one value per batch item ({n}), got {arr.shape[0]}")
    return [decode_utf8(x, name) for x in arr]


def net_session(args: dict, memory: str = DEFAULT_ORT_MEMORY):
    """The runtime of a net model's ``model.onnx``, configured by its NetParams
    (``runtime``: ONNX Runtime or OpenVINO, :func:`facetron.net_runtimes.open_runtime`;
    ``memory``: ONNX Runtime's arena rule, ``net_runtimes.ORT_MEMORY``)."""
    params = read_params(args, NetParams)
    return open_runtime(version_dir(args) / contract.MODEL_FILE, params.runtime, params.intra_op_threads or None,
                        params.providers, precision=params.precision, memory=memory)


def within_budget(members: list, budget: tuple[Callable[[dict], int], int] | None):
    """``members`` (index, feed) in consecutive runs whose summed cost stays within ``budget``'s limit
    (each feed alone is within it: its request was checked in ``read``)."""
    if budget is None:
        yield members
        return
    cost, limit = budget
    run, total = [], 0
    for member in members:
        c = cost(member[1])
        if run and total + c > limit:
            yield run
            run, total = [], 0
        run.append(member)
        total += c
    if run:
        yield run


def run_batched(
    requests: Sequence,
    read: Callable[[object], dict[str, np.ndarray]],
    run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    budget: tuple[Callable[[dict[str, np.ndarray]], int], int] | None = None,
) -> list:
    """Read each request's feed, run all valid ones as one batch, split outputs.

    Requests whose inputs break a rule get their own error response; requests
    whose non-batch dims differ from the first valid one run separately.
    ``budget`` = (cost of a feed, the most one call may run): a dynamic batch
    over it runs as several calls, each within it (Triton concatenates
    requests that were each checked alone)."""
    responses: list = [None] * len(requests)
    groups: dict[tuple, list[tuple[int, dict]]] = {}
    for i, request in enumerate(requests):
        try:
            feed = read(request)
            key = tuple((k, v.shape[1:], v.dtype.str) for k, v in sorted(feed.items()))
            groups.setdefault(key, []).append((i, feed))
        except Exception as exc:  # noqa: BLE001
            responses[i] = error_response(exc)
    for members in [chunk for group in groups.values() for chunk in within_budget(group, budget)]:
        try:
            feed = {k: np.concatenate([f[k] for _, f in members]) for k in members[0][1]}
            out = run(feed)
            start = 0
            for i, f in members:
                n = next(iter(f.values())).shape[0]
                responses[i] = response({k: v[start : start + n] for k, v in out.items()})
                start += n
        except Exception as exc:  # noqa: BLE001
            for i, _ in members:
                responses[i] = error_response(exc)
    return responses


def net_model(c: ModelContract) -> type:
    """A python-backend model class for a one-input, one-output ONNX net of
    contract ``c`` (``model.onnx`` in its version folder)."""
    (inp,), (out,) = c.inputs, c.outputs
    dtype, ndim = np.dtype(contract.NUMPY_DTYPES[inp.dtype]), len(inp.dims) + 1
    check = NET_CHECKS.get(c.name, lambda a, n: a)
    budget = NET_BUDGETS.get(c.name)

    class NetModel:
        __doc__ = f"The ``{c.name}`` model: {c.doc.splitlines()[0]}"

        def initialize(self, args):
            self.session = net_session(args)

        def _read(self, request):
            arr = check(get_input(request, inp.name, dtype=dtype, ndim=ndim), inp.name)
            return check_feed({inp.name: arr}, self.session)

        def _run(self, feed):
            return {out.name: self.session.run([out.name], feed)[0]}

        def execute(self, requests):
            return run_batched(requests, self._read, self._run, budget)

        def finalize(self):
            self.session = None

    NetModel.__name__ = NetModel.__qualname__ = "".join(p.title() for p in c.name.split("_")) + "Model"
    return NetModel


def unet_feed(request) -> dict[str, np.ndarray]:
    """``sample``, ``timestep`` (one per item, [N,1] on the wire -> [N]) and
    ``encoder_hidden_states`` of a UNet request, checked (``sample`` within the UNet's budget:
    :func:`facetron.pipeline.net_io.check_sample`)."""
    sample = check_sample(get_input(request, "sample", dtype=np.float32, ndim=4))  # sides, cells: before any work
    n = sample.shape[0]
    t = get_input(request, "timestep", required=False)
    if t is None or t.dtype != np.float32 or t.size != n:
        got = "nothing" if t is None else f"{t.dtype} {list(t.shape)}"
        raise InvalidInputError("timestep", f"expected FP32 with one value per batch item ({n}), got {got}")
    hidden = get_input(request, "encoder_hidden_states", dtype=np.float32, ndim=3)
    if hidden.shape[0] != n:
        raise InvalidInputError("encoder_hidden_states", f"expected one row per batch item ({n}), got {hidden.shape[0]}")
    for name, arr in (("sample", sample), ("timestep", t), ("encoder_hidden_states", hidden)):
        check_finite(arr, name)
    return {"sample": sample, "timestep": t.reshape(n), "encoder_hidden_states": hidden}
