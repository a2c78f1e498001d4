"""Malformed requests against every served model, over raw gRPC.

Every case must answer INVALID_ARGUMENT (or NOT_FOUND for an unknown user)
with a message that names the input — never INTERNAL — and the server stays
READY. Cases come from the contract (a wrong dtype and a wrong rank for every
input, every required input missing) plus what each graph needs beyond its
config (channels, token id range, UTF-8, minimum and maximum sizes, value
ranges). The models: every contract, the optional ones too (``controlnet``,
``vae_*_tiny``, ``unet_fewstep``: the session repository is assembled with
them, tests/conftest.py); a model the session repository does not serve has
its cases skipped, and every model it serves must have cases."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from facetron.client.tensors import infer_inputs
from tritonclient.utils import InferenceServerException

from facetron import contract

pytestmark = pytest.mark.triton

# portrait_stream (decoupled) runs the same parse and path as portrait: its stream is tested in test_triton_portrait;
# the mtcnn_* nets are the gpu target's (the cpu face_detector runs them in process)
SERVED = [c for c in contract.CONTRACTS + contract.OPTIONAL_CONTRACTS
          if not c.name.startswith("mtcnn_") and not c.decoupled]
_NP = {"UINT8": np.uint8, "FP32": np.float32, "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_, "STRING": object}
_WRONG = {"UINT8": np.float32, "FP32": np.float64, "INT32": np.float32, "INT64": np.float32, "BOOL": np.int32,
          "STRING": np.float32}


def _valid(c: contract.ModelContract, t: contract.Tensor, batch: int = 1) -> np.ndarray:
    """A well-formed value for one input (the batch dim added when the model batches)."""
    dims = [d if d > 0 else 16 for d in t.dims]
    if t.name == "images" and c.name == "face_select":
        dims = [1, 64, 64, 3]
    if t.name == "sample":
        dims = [t.dims[0], 8, 8]
    if t.name == "controlnet_cond":  # 8 px per latent cell of the sample
        dims = [3, 64, 64]
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


def _unet(sample_shape=(1, 4, 8, 8), **extra) -> dict[str, np.ndarray]:
    n = sample_shape[0]
    return {"sample": np.zeros(sample_shape, np.float32), "timestep": np.ones((n, 1), np.float32),
            "encoder_hidden_states": np.zeros((n, contract.TOKENS, 32), np.float32), **extra}


def _control(cond: np.ndarray | None = None, scale: float = 1.0, **unet) -> dict[str, np.ndarray]:
    """A controlnet request: the unet's inputs + the conditioning image at 8 px per latent cell and its scale."""
    return {**_unet(**unet), "controlnet_cond": np.zeros((1, 3, 64, 64), np.float32) if cond is None else cond,
            "conditioning_scale": np.full((1, 1), scale, np.float32)}


#: a UNet sample of 5x7 latent cells: within every budget and minimum, but not a multiple of the UNet's down factor
ODD_SAMPLE = (1, 4, 5, 7)
#: the tiny default UNet's step-cache deep feature channels and ControlNet residuals (name, channels, cells per
#: residual cell): the session repository's unet/1/control/control_residuals.json
TINY_FEATURE_CHANNELS = 64
TINY_CONTROL_RESIDUALS = (("down_block_residual_0", 32, 1), ("down_block_residual_1", 32, 1),
                          ("down_block_residual_2", 32, 2), ("down_block_residual_3", 64, 2),
                          ("mid_block_residual", 64, 2))


def _graph_cases() -> Iterator[tuple[str, str, dict[str, np.ndarray]]]:
    t_nan = np.full((1, 1), np.nan, np.float32)
    for unet in contract.RUNTIME_LORA_UNETS:  # unet, unet_fewstep: one contract, one code
        yield unet, "sample", _unet((1, 3, 8, 8))
        yield unet, "encoder_hidden_states", {**_unet(), "encoder_hidden_states": np.zeros((1, contract.TOKENS, 7),
                                                                                            np.float32)}
        yield unet, "sample", _unet((1, 4, 1, 1))
        yield unet, "user_id", _unet(user_id=_s(b"\xff\xfe").reshape(1, 1))
        yield unet, "style", _unet(style=_s(b"\xc3").reshape(1, 1))
        yield unet, "user_id", _unet(user_id=_s(b"bob\n").reshape(1, 1))
        yield unet, "timestep", {**_unet(), "timestep": t_nan}
        # sides the UNet's down path cannot halve (the tiny default's factor 2; the exported graph's skip connections
        # would not concatenate: INTERNAL before the served model checked it), the step cache's shallow step too
        yield unet, "sample", _unet(ODD_SAMPLE)
        yield unet, "sample", _unet((1, 4, 9, 12))
        yield unet, "sample", _unet(ODD_SAMPLE, deep_feature=np.zeros((1, TINY_FEATURE_CHANNELS, 5, 7), np.float32))
    # the control graph: all residuals at the sizes a 5x7 sample's would have (TINY_CONTROL_RESIDUALS)
    yield "unet", "sample", _unet(ODD_SAMPLE, **{name: np.zeros((1, ch, -(-5 // f), -(-7 // f)), np.float32)
                                                 for name, ch, f in TINY_CONTROL_RESIDUALS})
    yield "unet_inpaint", "sample", _unet((1, contract.INPAINT_UNET_CHANNELS, 5, 7))
    yield "controlnet", "sample", _control(sample_shape=ODD_SAMPLE, cond=np.zeros((1, 3, 40, 56), np.float32))
    # the ControlNet's residuals: the unet's control graph takes all of them, each at its block's size; the few-step
    # unet has no control graph (refused by name)
    yield "unet", "down_block_residual_0", _unet(mid_block_residual=np.zeros((1, 64, 3, 3), np.float32))
    yield "unet", "down_block_residual_11", _unet(down_block_residual_11=np.zeros((1, 32, 8, 8), np.float32))
    yield "unet_fewstep", "mid_block_residual", _unet(mid_block_residual=np.zeros((1, 64, 2, 2), np.float32))
    yield "controlnet", "sample", _control(sample_shape=(1, 4, 1, 1), cond=np.zeros((1, 3, 8, 8), np.float32))
    yield "controlnet", "encoder_hidden_states", {**_control(), "encoder_hidden_states": np.zeros(
        (1, contract.TOKENS, 7), np.float32)}
    yield "controlnet", "timestep", {**_control(), "timestep": t_nan}
    yield "controlnet", "controlnet_cond", _control(np.zeros((1, 3, 64, 56), np.float32))  # not 8 px per cell
    yield "controlnet", "controlnet_cond", _control(np.full((1, 3, 64, 64), 2.0, np.float32))  # not in [0, 1]
    yield "controlnet", "controlnet_cond", _control(np.full((1, 3, 64, 64), np.nan, np.float32))
    yield "controlnet", "conditioning_scale", _control(scale=contract.MAX_CONTROL_SCALE + 1)
    yield "controlnet", "conditioning_scale", _control(scale=float("nan"))
    for decoder, encoder in contract.VAE_MODELS.values():  # the full and the tiny autoencoder
        yield decoder.name, "latent", {"latent": np.zeros((1, 3, 8, 8), np.float32)}
        yield decoder.name, "latent", {"latent": np.full((1, 4, 8, 8), np.inf, np.float32)}
        yield encoder.name, "images", {"images": np.zeros((1, 1, 1, 3), np.uint8)}
        yield encoder.name, "images", {"images": np.zeros((1, 13, 13, 3), np.uint8)}
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
def session_models(full_repository) -> set[str]:
    """The models the session repository serves."""
    return {p.name for p in full_repository.iterdir() if (p / "config.pbtxt").is_file()}


@pytest.fixture(scope="module")
def raw(triton):
    with grpcclient.InferenceServerClient(triton.grpc_url) as c:
        yield c


def _infer(raw, model: str, feed: dict[str, np.ndarray]):
    return raw.infer(model, infer_inputs(feed), client_timeout=120)  # the client's own wire encoding


@pytest.mark.parametrize("model, name, feed", CASES, ids=[f"{m}.{n}.{i}" for i, (m, n, _) in enumerate(CASES)])
def test_malformed_request_gets_a_named_error(raw, session_models, model, name, feed) -> None:
    if model not in session_models:
        pytest.skip(f"{model}: not in the session repository (tests/conftest.py full_repository)")
    with pytest.raises(InferenceServerException) as info:
        _infer(raw, model, feed)
    status = str(info.value.status()).replace("StatusCode.", "")
    message = info.value.message()
    assert status in ("INVALID_ARGUMENT", "NOT_FOUND"), f"{model} {name}: {status} {message}"
    assert name in message or "user" in message, f"{model}: the message does not name {name!r}: {message}"
    assert raw.is_server_ready() and raw.is_model_ready(model)


def test_the_matrix_covers_every_served_model(session_models) -> None:
    """Every contract has cases; every model the session repository serves is one of them (portrait_stream: see
    SERVED), the optional ones (controlnet, the tiny autoencoder, unet_fewstep) included."""
    assert {m for m, _, _ in CASES} == {c.name for c in SERVED}
    assert session_models - {contract.PORTRAIT_STREAM.name} <= {c.name for c in SERVED}
    optional = {c.name for c in (contract.CONTROLNET, contract.VAE_DECODER_TINY, contract.VAE_ENCODER_TINY,
                                 contract.UNET_FEWSTEP)}
    assert optional <= session_models
    assert len(CASES) > 120


def test_the_sample_rule_is_what_export_recorded(full_repository, tmp_path) -> None:
    """The served UNets' side rule (net_io.check_sample_sides) reads the down factor export wrote into each graph
    folder that takes a sample (io.json): diffusers' own (2 ** num_upsamplers, its default_overall_up_factor), for
    the tiny default (2) and an SD-1.5-layout UNet (4 blocks: 8); a folder exported before the record falls back to
    SD-1.5's 8."""
    from diffusers import UNet2DConditionModel

    from facetron.diffusion.base_model import build_models
    from facetron.diffusion.model_spec import SD15, TINY
    from facetron.errors import InvalidInputError
    from facetron.export.onnx_export import graph_module
    from facetron.export.onnx_graph import unet_down_factor
    from facetron.pipeline.net_io import check_sample_sides, read_down_factor

    tiny = build_models(TINY)[0]
    for name in ("unet", "unet/shallow", "unet/control", "unet_fewstep", "controlnet"):
        model, _, sub = name.partition("/")
        assert read_down_factor(full_repository / model / "1" / sub) == 2 ** tiny.num_upsamplers == 2, name
    for name in ("text_encoder", "vae_decoder"):  # no sample: no record
        assert contract.UNET_DOWN_FACTOR not in (full_repository / name / "1" / contract.IO_FILE).read_text()
    sd15_layout = UNet2DConditionModel(**{**SD15.unet, "block_out_channels": (32, 32, 32, 32), "layers_per_block": 1,
                                          "cross_attention_dim": 32, "norm_num_groups": 8})
    assert unet_down_factor(graph_module("unet", unet=sd15_layout)) == 2 ** sd15_layout.num_upsamplers == 8
    (tmp_path / contract.IO_FILE).write_text('{"inputs": [], "outputs": []}')  # an io.json without the record
    assert read_down_factor(tmp_path) == read_down_factor(tmp_path / "absent") == contract.DEFAULT_UNET_DOWN_FACTOR
    sample = np.zeros(ODD_SAMPLE, np.float32)
    with pytest.raises(InvalidInputError) as err:
        check_sample_sides(sample, 2)
    assert err.value.input_name == "sample" and "multiples of 2 latent cells" in err.value.rule and "7x5" in err.value.rule
    assert check_sample_sides(np.zeros((1, 4, 6, 10), np.float32), 2).shape == (1, 4, 6, 10)
