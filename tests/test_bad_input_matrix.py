"""Malformed requests against every served model, over raw gRPC.

Every case must answer INVALID_ARGUMENT (or NOT_FOUND for an unknown user)
with a message that names the input — never INTERNAL — and the server stays
READY. Cases come from the contract (a wrong dtype and a wrong rank for every
input, every required input missing) plus what each graph needs beyond its
config (channels, token id range, UTF-8, minimum and maximum sizes)."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from facetron.client.tensors import infer_inputs
from tritonclient.utils import InferenceServerException

from facetron import contract

pytestmark = pytest.mark.triton

# portrait_stream (decoupled) runs the same parse and path as portrait: its stream is tested in test_triton_portrait
SERVED = [c for c in contract.CONTRACTS if not c.name.startswith("mtcnn_") and not c.decoupled]
_NP = {"UINT8": np.uint8, "FP32": np.float32, "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_, "STRING": object}
_WRONG = {"UINT8": np.float32, "FP32": np.float64, "INT32": np.float32, "INT64": np.float32, "BOOL": np.int32,
          "STRING": np.float32}


def _valid(c: contract.ModelContract, t: contract.Tensor, batch: int = 1) -> np.ndarray:
    """A well-formed value for one input (the batch dim added when the model batches)."""
    dims = [d if d > 0 else 16 for d in t.dims]
    if t.name == "images" and c.name == "face_select":
        dims = [1, 64, 64, 3]
    if t.name == "sample":
        dims = [4, 8, 8]
    if t.name == "latent":
        dims = [4, 8, 8]
    if t.name == "encoder_hidden_states":
        dims = [contract.TOKENS, 32]
    shape = ([batch] if c.max_batch_size > 0 else []) + dims
    if t.dtype == "STRING":
        value = {"user_id": b"", "style": b"studio", "scheduler": b"ddim", "prompt": b"a photo"}.get(t.name, b"x")
        return np.full(shape, value, dtype=object)
    if t.name == "input_ids":
        return np.full(shape, 49407, np.int32)
    return np.ones(shape, _NP[t.dtype])


def _required_feed(c: contract.ModelContract) -> dict[str, np.ndarray]:
    return {t.name: _valid(c, t) for t in c.inputs if not t.optional}


def _contract_cases() -> Iterator[tuple[str, str, dict[str, np.ndarray]]]:
    for c in SERVED:
        for t in c.inputs:
            good = _valid(c, t)
            base = _required_feed(c)
            if not t.optional:
                yield c.name, t.name, {k: v for k, v in base.items() if k != t.name}
            wrong = good.astype(_WRONG[t.dtype]) if t.dtype != "STRING" else np.ones(good.shape, np.float32)
            yield c.name, t.name, {**base, t.name: wrong}
            yield c.name, t.name, {**base, t.name: good.reshape(good.shape + (1,))}


def _s(*values: bytes) -> np.ndarray:
    return np.array(values, dtype=object)


def _graph_cases() -> Iterator[tuple[str, str, dict[str, np.ndarray]]]:
    hidden = np.zeros((1, contract.TOKENS, 32), np.float32)
    t1 = np.ones((1, 1), np.float32)
    yield "unet", "sample", {"sample": np.zeros((1, 3, 8, 8), np.float32), "timestep": t1, "encoder_hidden_states": hidden}
    yield "unet", "encoder_hidden_states", {"sample": np.zeros((1, 4, 8, 8), np.float32), "timestep": t1,
                                            "encoder_hidden_states": np.zeros((1, contract.TOKENS, 7), np.float32)}
    yield "unet", "sample", {"sample": np.zeros((1, 4, 1, 1), np.float32), "timestep": t1, "encoder_hidden_states": hidden}
    yield "unet", "user_id", {"sample": np.zeros((1, 4, 8, 8), np.float32), "timestep": t1,
                              "encoder_hidden_states": hidden, "user_id": _s(b"\xff\xfe").reshape(1, 1)}
    yield "unet", "style", {"sample": np.zeros((1, 4, 8, 8), np.float32), "timestep": t1,
                            "encoder_hidden_states": hidden, "style": _s(b"\xc3").reshape(1, 1)}
    yield "unet", "user_id", {"sample": np.zeros((1, 4, 8, 8), np.float32), "timestep": t1,
                              "encoder_hidden_states": hidden, "user_id": _s(b"bob\n").reshape(1, 1)}
    yield "unet", "timestep", {"sample": np.zeros((1, 4, 8, 8), np.float32), "timestep": np.full((1, 1), np.nan, np.float32),
                               "encoder_hidden_states": hidden}
    yield "vae_decoder", "latent", {"latent": np.zeros((1, 3, 8, 8), np.float32)}
    yield "vae_decoder", "latent", {"latent": np.full((1, 4, 8, 8), np.inf, np.float32)}
    yield "vae_encoder", "images", {"images": np.zeros((1, 1, 1, 3), np.uint8)}
    yield "vae_encoder", "images", {"images": np.zeros((1, 13, 13, 3), np.uint8)}
    yield "text_encoder", "input_ids", {"input_ids": np.full((1, contract.TOKENS), -1, np.int32)}
    yield "text_encoder", "input_ids", {"input_ids": np.full((1, contract.TOKENS), 10**6, np.int32)}
    yield "tokenizer", "prompt", {"prompt": _s(b"ok", b"\xff")}
    yield "tokenizer", "prompt", {"prompt": _s(b"x" * (contract.MAX_PROMPT_BYTES + 1))}
    yield "face_detector", "images", {"images": np.zeros((1, 4, 4, 3), np.uint8)}
    yield "face_detector", "images", {"images": np.zeros((1, contract.MAX_IMAGE_SIDE + 8, 16, 3), np.uint8)}
    yield "face_embedder", "faces", {"faces": np.zeros((1, 150, 150, 3), np.uint8)[:, :, :149]}
    yield "face_select", "images", {"images": np.zeros((1, 8, 8, 3), np.uint8), "user_id": _s(b"nobody")}
    yield "face_select", "reference_embedding", {"images": np.zeros((1, 64, 64, 3), np.uint8),
                                                 "reference_embedding": np.zeros((1, 128), np.float32)}
    yield "face_select", "top_k", {"images": np.zeros((1, 64, 64, 3), np.uint8), "user_id": _s(b"x"),
                                   "top_k": np.array([-1], np.int32)}
    yield "face_select", "user_id", {"images": np.zeros((1, 64, 64, 3), np.uint8), "user_id": _s(b"\xff")}
    for model in ("portrait_generator", "portrait"):
        user = {"user_id": _s(b"nobody")} if model == "portrait" else {}
        yield model, "height", {**user, "height": np.array([4096], np.int32)}
        yield model, "num_images", {**user, "num_images": np.array([10**6], np.int32)}
        yield model, "steps", {**user, "steps": np.array([-3], np.int32)}
        yield model, "prompt", {**user, "prompt": _s(b"\xff")}
        yield model, "template", {**user, "template": np.zeros((8, 8, 3), np.uint8)}
        yield model, "template", {**user, "template": np.zeros((contract.MAX_TEMPLATE_SIDE + 8, 64, 3), np.uint8)}
        yield model, "user_id", {"user_id": _s(b"../etc")}
        yield model, "user_id", {"user_id": _s(b"ok\n")}
        yield model, "seed", {**user, "seed": np.array([-1], np.int64)}
    yield "portrait", "user_id", {"num_images": np.array([1], np.int32)}
    yield "portrait", "top_k", {"user_id": _s(b"nobody"), "top_k": np.array([-2], np.int32)}


CASES = list(_contract_cases()) + list(_graph_cases())


@pytest.fixture(scope="module")
def raw(triton):
    with grpcclient.InferenceServerClient(triton.grpc_url) as c:
        yield c


def _infer(raw, model: str, feed: dict[str, np.ndarray]):
    return raw.infer(model, infer_inputs(feed), client_timeout=120)  # the client's own wire encoding


@pytest.mark.parametrize("model, name, feed", CASES, ids=[f"{m}.{n}.{i}" for i, (m, n, _) in enumerate(CASES)])
def test_malformed_request_gets_a_named_error(raw, model, name, feed) -> None:
    with pytest.raises(InferenceServerException) as info:
        _infer(raw, model, feed)
    status = str(info.value.status()).replace("StatusCode.", "")
    message = info.value.message()
    assert status in ("INVALID_ARGUMENT", "NOT_FOUND"), f"{model} {name}: {status} {message}"
    assert name in message or "user" in message, f"{model}: the message does not name {name!r}: {message}"
    assert raw.is_server_ready() and raw.is_model_ready(model)


def test_the_matrix_covers_every_served_model() -> None:
    assert {m for m, _, _ in CASES} == {c.name for c in SERVED}
    assert len(CASES) > 120
