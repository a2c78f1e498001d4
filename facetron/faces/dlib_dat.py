"""Reader for dlib's binary DNN serialization (``dlib_face_recognition_resnet_model_v1.dat``).

dlib writes a network recursively, outermost layer first: every ``add_layer``
writes its version, then its whole sub-network, then its own layer details and
a few bookkeeping fields. Tag and skip layers write only a version, and their
tag ids are not stored at all, so a file can only be read against a known
network type -- exactly like dlib itself, which deserializes into a C++ type.
:func:`anet_spec` spells out dlib's ``anet_type`` (``tools/python/src/
face_recognition.cpp``) and :func:`read_dlib_dat` walks the file against it.

Encodings (``dlib/serialize.h``, ``dlib/cuda/tensor.h``):

* integers: one control byte (low nibble = byte count, bit 0x80 = negative),
  then that many little-endian magnitude bytes;
* floats/doubles: ``int64 mantissa`` and ``int16 exponent`` integers, value =
  mantissa * 2**exponent (exponents 32000..32002 mean +inf, -inf, nan);
* strings: integer length + raw bytes; bools: ASCII ``'0'``/``'1'``;
* tensors: int version 2, four int64 dims (n, k, nr, nc), then float32 LE data;
  alias tensors (shape only): int version 1 + four dims.

This module needs only numpy; no pickle, no dlib.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from facetron.contract import CHIP_SIZE, EMBEDDING_DIM  # dlib's anet input side and output width
from facetron.errors import FacetronError

# --------------------------------------------------------------------------------------
# Architecture description (dlib's anet_type), forward order: input -> loss.
# --------------------------------------------------------------------------------------

#: dlib's residual stages, forward order: (filters, residual blocks, first block downsamples).
ANET_STAGES: tuple[tuple[int, int, bool], ...] = (
    (32, 3, False),   # alevel4
    (64, 4, True),    # alevel3
    (128, 3, True),   # alevel2
    (256, 3, True),   # alevel1
    (256, 1, True),   # alevel0
)
ANET_STEM_FILTERS = 32


@dataclass(frozen=True)
class LayerSpec:
    """One expected layer. ``kind`` is the dlib layer name; ``attrs`` are the
    hyper-parameters that dlib fixes at compile time (checked against the file)."""

    kind: str
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DatLayer:
    """One layer read from the file (forward order)."""

    kind: str
    attrs: dict[str, Any]
    arrays: dict[str, np.ndarray]


@dataclass
class DlibNet:
    path: Path
    layers: list[DatLayer]

    def of_kind(self, kind: str) -> list[DatLayer]:
        return [layer for layer in self.layers if layer.kind == kind]


class DatFormatError(FacetronError, ValueError):
    """The .dat file is truncated, corrupt, or not the expected network."""

    status = "FAILED_PRECONDITION"


def _con(n: int, k: int, stride: int) -> LayerSpec:
    # dlib's default padding: k//2 when stride == 1, else 0 (dlib/dnn/layers.h).
    return LayerSpec("con", {"num_filters": n, "nr": k, "nc": k, "stride": stride,
                             "padding": k // 2 if stride == 1 else 0})


def _block(n: int, stride: int) -> list[LayerSpec]:
    # block<N,BN,stride> = BN<con<N,3,3,1,1,relu<BN<con<N,3,3,stride,stride,SUB>>>>>
    return [_con(n, 3, stride), LayerSpec("affine"), LayerSpec("relu"),
            _con(n, 3, 1), LayerSpec("affine")]


def _ares(n: int) -> list[LayerSpec]:
    # relu<add_prev1<block<N,affine,1,tag1<SUB>>>>
    return [LayerSpec("tag", {"id": 1}), *_block(n, 1),
            LayerSpec("add_prev", {"tag": 1}), LayerSpec("relu")]


def _ares_down(n: int) -> list[LayerSpec]:
    # relu<add_prev2<avg_pool<2,2,2,2,skip1<tag2<block<N,affine,2,tag1<SUB>>>>>>>
    return [LayerSpec("tag", {"id": 1}), *_block(n, 2), LayerSpec("tag", {"id": 2}),
            LayerSpec("skip", {"tag": 1}),
            LayerSpec("avg_pool", {"nr": 2, "nc": 2, "stride": 2, "padding": 0}),
            LayerSpec("add_prev", {"tag": 2}), LayerSpec("relu")]


def anet_spec(stages: Sequence[tuple[int, int, bool]] = ANET_STAGES) -> list[LayerSpec]:
    """dlib's ``anet_type`` as a forward-ordered layer list."""
    spec = [LayerSpec("input", {"nr": CHIP_SIZE, "nc": CHIP_SIZE}),
            _con(ANET_STEM_FILTERS, 7, 2), LayerSpec("affine"), LayerSpec("relu"),
            LayerSpec("max_pool", {"nr": 3, "nc": 3, "stride": 2, "padding": 0})]
    for filters, blocks, down in stages:
        for i in range(blocks):
            spec += _ares_down(filters) if (down and i == 0) else _ares(filters)
    spec += [LayerSpec("avg_pool", {"nr": 0, "nc": 0, "stride": 1, "padding": 0}),
             LayerSpec("fc", {"num_outputs": EMBEDDING_DIM, "bias": False}),
             LayerSpec("loss_metric")]
    return spec


# --------------------------------------------------------------------------------------
# Primitive decoding
# --------------------------------------------------------------------------------------

_FLOAT_SPECIAL = {32000: np.inf, 32001: -np.inf, 32002: np.nan}


class _Stream:
    def __init__(self, data: bytes, path: Path):
        self.buf = memoryview(data)
        self.pos = 0
        self.path = path
        self.where = "file header"

    def fail(self, expected: str) -> DatFormatError:
        return DatFormatError(
            f"{self.path}: corrupt or truncated dlib model at byte {self.pos} "
            f"(while reading {self.where}): expected {expected}"
        )

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.fail(f"{what} ({n} bytes, only {len(self.buf) - self.pos} left)")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def read_int(self, what: str = "an integer") -> int:
        ctrl = self.take(1, what)[0]
        size = ctrl & 0x0F
        if size == 0 or size > 8 or (ctrl & 0x70):
            self.pos -= 1
            raise self.fail(f"{what} (bad control byte 0x{ctrl:02x})")
        value = int.from_bytes(self.take(size, what), "little")
        return -value if ctrl & 0x80 else value

    def read_float(self, what: str = "a float") -> float:
        if self.pos < len(self.buf) and self.buf[self.pos] & 0x70:
            raise self.fail(f"{what} in dlib's binary float format (old ASCII format is not supported)")
        mantissa = self.read_int(what)
        exponent = self.read_int(what)
        if exponent in _FLOAT_SPECIAL:
            return float(_FLOAT_SPECIAL[exponent])
        return float(np.ldexp(float(mantissa), exponent))

    def read_bool(self, what: str = "a bool") -> bool:
        ch = self.take(1, what)[0]
        if ch not in (ord("0"), ord("1")):
            self.pos -= 1
            raise self.fail(f"{what} ('0' or '1', got byte 0x{ch:02x})")
        return ch == ord("1")

    def read_string(self, what: str = "a string") -> str:
        n = self.read_int(what)
        if n > 256:
            raise self.fail(f"{what} (implausible length {n})")
        return bytes(self.take(n, what)).decode("latin-1")

    def version_string(self, allowed: Sequence[str]) -> str:
        start = self.pos
        try:
            v = self.read_string(f"one of {list(allowed)}")
        except DatFormatError:
            self.pos = start
            raise self.fail(f"a layer version string, one of {list(allowed)}") from None
        if v not in allowed:
            self.pos = start
            raise self.fail(f"one of {list(allowed)}, found {v!r}")
        return v

    def version(self, allowed: Sequence[int]) -> int:
        start = self.pos
        v = self.read_int("a version number")
        if v not in allowed:
            self.pos = start
            raise self.fail(f"version in {list(allowed)}, found {v}")
        return v

    def _dims(self, what: str) -> tuple[int, int, int, int]:
        dims = tuple(self.read_int(what) for _ in range(4))
        if any(d < 0 or d > 1 << 31 for d in dims):
            raise self.fail(f"{what} with sane dimensions, got {dims}")
        return dims  # type: ignore[return-value]

    def tensor(self, what: str = "a tensor") -> np.ndarray:
        self.version([2])
        dims = self._dims(what)
        count = int(np.prod(dims, dtype=np.int64))
        raw = self.take(4 * count, f"{what} data {dims}")
        return np.frombuffer(raw, dtype="<f4").reshape(dims).astype(np.float32)

    def alias(self, what: str = "an alias tensor") -> tuple[int, int, int, int]:
        self.version([1])
        return self._dims(what)


# --------------------------------------------------------------------------------------
# Layer details (dlib/dnn/layers.h, input.h, loss.h)
# --------------------------------------------------------------------------------------


def _split(params: np.ndarray, shapes: Sequence[tuple[int, ...]], s: _Stream) -> list[np.ndarray]:
    flat = params.reshape(-1)
    sizes = [int(np.prod(sh)) for sh in shapes]
    if sum(sizes) > flat.size:
        raise s.fail(f"a parameter tensor of at least {sum(sizes)} values, found {flat.size}")
    out, off = [], 0
    for sh, n in zip(shapes, sizes):
        out.append(flat[off:off + n].reshape(sh).copy())
        off += n
    return out


def _check(s: _Stream, spec: LayerSpec, found: dict[str, Any]) -> None:
    for key, want in spec.attrs.items():
        if key in found and found[key] != want:
            raise s.fail(f"{spec.kind} with {key}={want}, found {found[key]}")


def _read_input(s: _Stream, spec: LayerSpec) -> DatLayer:
    s.version_string(["input_rgb_image_sized"])
    avg = tuple(s.read_float("input mean") for _ in range(3))
    nr, nc = s.read_int("input rows"), s.read_int("input cols")
    _check(s, spec, {"nr": nr, "nc": nc})
    return DatLayer("input", {"avg_rgb": avg, "nr": nr, "nc": nc}, {})


def _read_con(s: _Stream, spec: LayerSpec) -> DatLayer:
    v = s.version_string(["con_4", "con_5", "con_6"])
    params = s.tensor("con params")
    num_filters = s.read_int()
    nr, nc = s.read_int(), s.read_int()
    sy, sx = s.read_int(), s.read_int()
    py, px = s.read_int(), s.read_int()
    fshape = s.alias("con filters")
    s.alias("con biases")  # read past: the bias shape follows from num_filters
    for _ in range(4):  # learning-rate / weight-decay multipliers
        s.read_float("con multiplier")
    use_bias = s.read_bool("con use_bias") if v in ("con_5", "con_6") else True
    use_relu = s.read_bool("con use_relu") if v == "con_6" else False
    if sy != sx or py != px or nr != nc:
        raise s.fail(f"a square con layer, found {nr}x{nc} stride {sy},{sx} padding {py},{px}")
    _check(s, spec, {"num_filters": num_filters, "nr": nr, "nc": nc, "stride": sy, "padding": py})
    if use_relu:
        raise s.fail("con without a fused relu (use_relu=false)")
    if fshape[0] != num_filters or fshape[2:] != (nr, nc):
        raise s.fail(f"con filters of shape ({num_filters}, k, {nr}, {nc}), found {fshape}")
    shapes: list[tuple[int, ...]] = [fshape] + ([(num_filters,)] if use_bias else [])
    arrays = _split(params, shapes, s)
    out = {"weight": arrays[0]}
    if use_bias:
        out["bias"] = arrays[1]
    return DatLayer("con", {"num_filters": num_filters, "kernel": nr, "stride": sy, "padding": py}, out)


def _read_bn_as_affine(s: _Stream, mode_name: str) -> DatLayer:
    params = s.tensor("bn params")
    gshape, bshape = s.alias("bn gamma"), s.alias("bn beta")
    for _ in range(2):
        s.tensor("bn batch stats")
    running_means = s.tensor("bn running means").reshape(-1)
    running_vars = s.tensor("bn running variances").reshape(-1)
    s.read_int("bn num_updates")
    s.read_int("bn running_stats_window_size")
    for _ in range(4):
        s.read_float("bn multiplier")
    eps = s.read_float("bn eps")
    gamma, beta = (a.reshape(-1) for a in _split(params, [gshape, bshape], s))
    # Same folding as dlib's affine_(const bn_&) constructor.
    g = gamma / np.sqrt(running_vars + eps)
    b = beta - g * running_means
    return DatLayer("affine", {"mode": mode_name}, {"gamma": g.astype(np.float32),
                                                    "beta": b.astype(np.float32)})


def _read_affine(s: _Stream, spec: LayerSpec) -> DatLayer:
    v = s.version_string(["affine_", "affine_2", "bn_con2", "bn_fc2"])
    if v.startswith("bn_"):
        return _read_bn_as_affine(s, "conv" if v == "bn_con2" else "fc")
    params = s.tensor("affine params")
    gshape, bshape = s.alias("affine gamma"), s.alias("affine beta")
    mode = s.read_int("affine mode")
    disabled = s.read_bool("affine disabled") if v == "affine_2" else False
    if disabled:
        return DatLayer("affine", {"mode": "conv" if mode == 0 else "fc", "disabled": True}, {})
    gamma, beta = (a.reshape(-1) for a in _split(params, [gshape, bshape], s))
    return DatLayer("affine", {"mode": "conv" if mode == 0 else "fc"}, {"gamma": gamma, "beta": beta})


def _read_relu(s: _Stream, spec: LayerSpec) -> DatLayer:
    v = s.version_string(["relu_", "relu_2"])
    disabled = s.read_bool("relu disabled") if v == "relu_2" else False
    return DatLayer("relu", {"disabled": disabled}, {})


def _read_pool(kind: str):
    def read(s: _Stream, spec: LayerSpec) -> DatLayer:
        s.version_string([f"{kind}_2"])
        nr, nc = s.read_int(), s.read_int()
        sy, sx = s.read_int(), s.read_int()
        py, px = s.read_int(), s.read_int()
        if sy != sx or py != px or nr != nc:
            raise s.fail(f"a square {kind}, found {nr}x{nc} stride {sy},{sx} padding {py},{px}")
        _check(s, spec, {"nr": nr, "nc": nc, "stride": sy, "padding": py})
        return DatLayer(kind, {"kernel": nr, "stride": sy, "padding": py}, {})
    return read


def _read_add_prev(s: _Stream, spec: LayerSpec) -> DatLayer:
    s.version_string(["add_prev_"])
    return DatLayer("add_prev", dict(spec.attrs), {})


def _read_fc(s: _Stream, spec: LayerSpec) -> DatLayer:
    v = s.version_string(["fc_2", "fc_3"])
    num_outputs, num_inputs = s.read_int("fc num_outputs"), s.read_int("fc num_inputs")
    params = s.tensor("fc params")
    s.alias("fc weights"), s.alias("fc biases")  # read past: the shapes follow from num_inputs / num_outputs
    bias_mode = s.read_int("fc bias mode")
    for _ in range(4):
        s.read_float("fc multiplier")
    use_bias = s.read_bool("fc use_bias") if v == "fc_3" else True
    has_bias = bias_mode == 0 and use_bias
    _check(s, spec, {"num_outputs": num_outputs, "bias": has_bias})
    shapes: list[tuple[int, ...]] = [(num_inputs, num_outputs)] + ([(num_outputs,)] if has_bias else [])
    arrays = _split(params, shapes, s)
    out = {"weight": arrays[0]}  # [in, out]: dlib computes x @ W
    if has_bias:
        out["bias"] = arrays[1]
    return DatLayer("fc", {"num_inputs": num_inputs, "num_outputs": num_outputs}, out)


def _read_loss_metric(s: _Stream, spec: LayerSpec) -> DatLayer:
    v = s.version_string(["loss_metric_", "loss_metric_2"])
    if v == "loss_metric_":
        margin, dist = 0.1, 0.75
    else:
        margin, dist = s.read_float("loss margin"), s.read_float("loss dist_thresh")
    return DatLayer("loss_metric", {"margin": margin, "dist_thresh": dist}, {})


_DETAIL_READERS = {
    "input": _read_input,
    "con": _read_con,
    "affine": _read_affine,
    "relu": _read_relu,
    "max_pool": _read_pool("max_pool"),
    "avg_pool": _read_pool("avg_pool"),
    "add_prev": _read_add_prev,
    "fc": _read_fc,
    "loss_metric": _read_loss_metric,
}


# --------------------------------------------------------------------------------------
# Network walk (dlib/dnn/core.h)
# --------------------------------------------------------------------------------------


def _skip_tensor(s: _Stream, what: str) -> None:
    s.tensor(what)  # bookkeeping tensors are normally empty; read and drop


def read_dlib_dat(path: str | Path, spec: Sequence[LayerSpec] | None = None) -> DlibNet:
    """Parse a dlib DNN ``.dat`` file against ``spec`` (default: dlib's ``anet_type``).

    Returns the layers in forward order with plain float32 numpy arrays.
    Raises :class:`DatFormatError` naming the file and what was expected when the
    file is truncated, corrupt or holds a different network.
    """
    path = Path(path)
    if not path.is_file():
        raise DatFormatError(f"{path}: no such file (expected a dlib .dat model)")
    spec = list(spec) if spec is not None else anet_spec()
    if spec[0].kind != "input" or spec[-1].kind != "loss_metric":
        raise ValueError("spec must start with 'input' and end with 'loss_metric'")
    s = _Stream(path.read_bytes(), path)

    # Header: add_loss_layer v1, loss details, then the sub-network.
    s.where = "the loss layer"
    s.version([1])
    loss = _read_loss_metric(s, spec[-1])

    body = spec[1:-1]  # layers between input and loss, forward order
    # Descend: versions of every layer from the output down to the first (input-level) one.
    versions: list[int] = [0] * len(body)
    for i in range(len(body) - 1, -1, -1):
        kind = body[i].kind
        s.where = f"layer {i + 1} ({kind}) header"
        if kind in ("tag", "skip"):
            versions[i] = s.version([1])
        elif i == 0:
            versions[i] = s.version([2, 3])  # add_layer whose sub-network is the input layer
        else:
            versions[i] = s.version([1, 2])

    s.where = "the input layer"
    layers = [_read_input(s, spec[0])]
    # Ascend: details + bookkeeping of each add_layer, innermost first.
    for i, ls in enumerate(body):
        if ls.kind in ("tag", "skip"):
            layers.append(DatLayer(ls.kind, dict(ls.attrs), {}))
            continue
        s.where = f"layer {i + 1} ({ls.kind})"
        layers.append(_DETAIL_READERS[ls.kind](s, ls))
        for flag in ("setup_called", "gradient_input_is_stale", "output_disabled"):
            s.read_bool(flag)
        _skip_tensor(s, "x_grad")
        _skip_tensor(s, "cached_output")
        if i == 0:
            _skip_tensor(s, "grad_final")
            if versions[i] >= 3:
                s.read_int("sample_expansion_factor")
        elif versions[i] == 2:
            _skip_tensor(s, "params_grad")
    layers.append(loss)
    if s.pos != len(s.buf):
        s.where = "end of file"
        raise s.fail(f"end of file, but {len(s.buf) - s.pos} bytes remain")
    return DlibNet(path, layers)
