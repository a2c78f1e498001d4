"""Step caching (DeepCache) on the tiny model: the two graphs against diffusers'
own ``UNet2DConditionModel`` (the oracle), the schedule, and the sampler.

* ``full`` = the UNet: torch bit for bit, ONNX Runtime within
  ``export.validate.TOLERANCES`` (plain and runtime-LoRA).
* Exactness of the split: ``shallow(x, t, h, deep_feature of full(x, t, h))``
  is the full UNet (torch bit for bit; ONNX Runtime within tolerance), with
  non-zero runtime-LoRA inputs too (which the shallow part must see).
* Interval 1 is the uncached loop bit for bit through ``denoise``; intervals
  2 and 3 at 25 steps make ceil(25/N) full evaluations. Their deviation from
  the uncached image (PSNR of the decoded uint8 images) is printed (``-s``),
  not asserted: the tiny model's weights are random.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from diffusers import UNet2DConditionModel

from facetron import contract
from facetron.diffusion.base_model import load_base_model
from facetron.diffusion.model_spec import TINY
from facetron.diffusion.sampler import GenerationRequest, denoise
from facetron.deviation import psnr_uint8
from facetron.diffusion.step_cache import (CachedUNet, check_interval, full_step_count, is_full_step,
                                           step_cached)
from facetron.errors import InvalidInputError
from facetron.export.onnx_export import graph_module
from facetron.export.onnx_graph import ModelDims, example_inputs, model_io, read_io
from facetron.export.runtime_lora import RuntimeLoraUNet, build_manifest, runtime_lora_io
from facetron.export.step_cache_graphs import (DeepCacheUNet, export_deep_cache_unet,
                                               export_runtime_lora_deep_cache_unet)
from facetron.export.validate import TOLERANCES, compare

RANK = 4
STEPS, GUIDANCE, SEED, SIZE = 25, 7.0, 3, 128


@pytest.fixture(scope="module")
def base():
    return load_base_model()


@pytest.fixture(scope="module")
def dims(base) -> ModelDims:
    return ModelDims.of(base)


@pytest.fixture(scope="module")
def exported(base, dims, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("step_cache")
    deep, shallow = export_deep_cache_unet(base.unet, out, dims=dims)
    lora_deep, lora_shallow = export_runtime_lora_deep_cache_unet(base.unet, out, dims=dims, rank=RANK)
    # the runtime-LoRA pair is the served unet: exported under its name, the shallow graph inside (unet/shallow/)
    return {"unet_deep": deep, "unet_shallow": shallow, "unet": lora_deep, "unet/shallow": lora_shallow}


@pytest.fixture(scope="module")
def sessions(exported) -> dict[str, ort.InferenceSession]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return {name: ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            for name, path in exported.items()}


def run(session: ort.InferenceSession, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The session on the part of ``feed`` it takes (the shallow graph leaves unused LoRA inputs out)."""
    return session.run(None, {i.name: feed[i.name] for i in session.get_inputs()})


def tensors(feed: dict[str, np.ndarray]) -> list[torch.Tensor]:
    return [torch.from_numpy(v) for v in feed.values()]


def assert_within(got: np.ndarray, want: np.ndarray, model: str, what: str) -> None:
    atol, rtol = TOLERANCES[model]
    report = compare(got, want, atol, rtol)
    print(f"{what}: max_abs={report['max_abs']:.3g} (atol={atol}, rtol={rtol})")
    assert report["pass"], (what, report)


# ----------------------------------------------------------------------------- the schedule


def test_schedule_rule():
    assert [is_full_step(i, 3) for i in range(7)] == [True, False, False, True, False, False, True]
    assert all(is_full_step(i, 1) for i in range(5))
    assert [full_step_count(25, n) for n in (1, 2, 3, 5)] == [25, 13, 9, 5]
    for bad in (0, -1, 1.5, True, "2", None):
        with pytest.raises(InvalidInputError):
            check_interval(bad)


def test_cached_unet_counts_and_restarts_per_generation():
    calls = []
    full = lambda x, t, h, **kw: (calls.append(("full", float(t[0]), kw)) or (x, x + 1))  # noqa: E731
    shallow = lambda x, t, h, f, **kw: (calls.append(("shallow", float(t[0]), kw)) or f)  # noqa: E731
    cached = CachedUNet(full, shallow, 2)
    x, h = np.zeros((2, 4, 2, 2), np.float32), np.zeros((2, 77, 8), np.float32)
    for gen in range(2):  # the second generation starts with a full step (its timestep rises)
        for t in (900.0, 700.0, 500.0):
            out = cached(x, np.full(2, t, np.float32), h, lora_b_0=1)
    assert [c[0] for c in calls] == ["full", "shallow", "full"] * 2
    assert all(c[2] == {"lora_b_0": 1} for c in calls)
    assert (cached.full_calls, cached.shallow_calls) == (4, 2) and np.array_equal(out, x)
    cached(np.zeros((4, 4, 2, 2), np.float32), np.full(4, 300.0, np.float32), h)  # another batch: full again
    assert calls[-1][0] == "full"
    cached.reset()
    assert (cached.full_calls, cached.shallow_calls, cached.step) == (0, 0, 0)


def test_unsupported_unet_is_refused():
    unet = UNet2DConditionModel(**{**TINY.unet, "num_class_embeds": 10})
    with pytest.raises(ValueError, match="class embedding"):
        DeepCacheUNet(unet)


# ----------------------------------------------------------------------------- the graphs against diffusers


def test_full_graph_equals_diffusers_unet(base, dims, sessions):
    feed = example_inputs(model_io("unet", dims)[0], dims, batch=2, seed=1)
    with torch.no_grad():
        want = base.unet(*tensors(feed), return_dict=False)[0].numpy()
        pred, feature = (t.numpy() for t in DeepCacheUNet(base.unet).full(*tensors(feed)))
    assert np.array_equal(pred, want)  # same operations in the same order as diffusers' forward
    assert feature.shape == (2, 64, 16, 16)
    got_pred, got_feature = run(sessions["unet_deep"], feed)
    assert_within(got_pred, want, "unet", "unet_deep noise_pred vs diffusers")
    assert_within(got_feature, feature, "unet", "unet_deep deep_feature vs torch")


@pytest.mark.parametrize("side", [(16, 16), (15, 13)])
def test_shallow_on_a_fresh_feature_is_the_unet_torch(base, side):
    """Exact in torch, also at a side that is not a multiple of the up factor (upsample sizes)."""
    g = torch.Generator().manual_seed(2)
    x, t, h = torch.randn(2, 4, *side, generator=g), torch.tensor([981.0, 21.0]), torch.randn(2, 77, 32, generator=g)
    dc = DeepCacheUNet(base.unet)
    with torch.no_grad():
        want = base.unet(x, t, h, return_dict=False)[0]
        _, feature = dc.full(x, t, h)
        assert torch.equal(dc.shallow(x, t, h, feature), want)
        assert not torch.allclose(dc.shallow(x, t, h, torch.zeros_like(feature)), want)  # the feature matters


def test_shallow_graph_on_a_fresh_feature_is_the_unet(base, dims, sessions):
    feed = example_inputs(model_io("unet", dims)[0], dims, batch=2, seed=3)
    with torch.no_grad():
        want = base.unet(*tensors(feed), return_dict=False)[0].numpy()
    _, feature = run(sessions["unet_deep"], feed)
    got = run(sessions["unet_shallow"], {**feed, "deep_feature": feature})[0]
    assert_within(got, want, "unet", "unet_shallow(deep_feature of unet_deep) vs diffusers")


def test_runtime_lora_graphs_on_a_fresh_feature(base, dims, sessions, exported):
    """Non-zero LoRA inputs: full = the runtime-LoRA UNet, shallow on its feature = the same,
    in torch (exactly) and ONNX Runtime; the shallow part sees the LoRA."""
    inputs, _ = runtime_lora_io(dims, build_manifest(base.unet, RANK))
    feed = example_inputs(inputs, dims, batch=2, seed=4, rank=RANK)  # LoRA inputs ~ N(0, 0.05^2)
    runtime = RuntimeLoraUNet(base.unet)
    dc = DeepCacheUNet(runtime)
    args = tensors(feed)
    zero_lora = [torch.zeros_like(a) for a in args[3:]]
    with torch.no_grad():
        want = runtime(*args).numpy()
        pred, feature = dc.full(*args)
        assert np.array_equal(pred.numpy(), want)
        assert np.array_equal(dc.shallow(*args[:3], feature, *args[3:]).numpy(), want)
        without = dc.shallow(*args[:3], feature, *zero_lora).numpy()
        assert float(np.abs(without - want).max()) > 1e-3  # the LoRA acts in the shallow part
        assert float(np.abs(base.unet(*args[:3], return_dict=False)[0].numpy() - want).max()) > 1e-3
    got_pred, got_feature = run(sessions["unet"], feed)
    assert_within(got_pred, want, "unet_lora", "served unet (full graph) noise_pred vs RuntimeLoraUNet")
    got = run(sessions["unet/shallow"], {**feed, "deep_feature": got_feature})[0]
    assert_within(got, want, "unet_lora", "unet/shallow(deep_feature of the full graph) vs RuntimeLoraUNet")
    # exported in the unet's version-folder layout, under its served name
    full_dir, shallow_dir = exported["unet"].parent, exported["unet/shallow"].parent
    assert (full_dir.name, shallow_dir.name, shallow_dir.parent) == (contract.UNET.name, contract.SHALLOW_FOLDER,
                                                                     full_dir)
    # io.json lists exactly the graph's inputs; the left-out ones are the deep part's LoRA inputs
    specs, _, io = read_io(shallow_dir)
    unused = io["deep_cache"]["unused_inputs"]
    assert [s.name for s in specs] == [i.name for i in sessions["unet/shallow"].get_inputs()]
    assert unused and set(unused).isdisjoint(s.name for s in specs)
    assert len(specs) + len(unused) == len(inputs) + 1  # + deep_feature


# ----------------------------------------------------------------------------- through the sampler


def numpy_fn(module_fn):
    """A torch function as a numpy callable (tuple outputs as tuples)."""
    def call(*arrays, **_):
        with torch.no_grad():
            out = module_fn(*(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays))
        return tuple(o.numpy() for o in out) if isinstance(out, tuple) else out.numpy()
    return call


@pytest.fixture(scope="module")
def sampling(base):
    """Everything a generation needs: torch nets, text embeddings, the decoder, the uncached image."""
    rng = np.random.default_rng(7)
    cond, uncond = (rng.standard_normal((1, 77, 32)).astype(np.float32) for _ in range(2))
    decoder = graph_module("vae_decoder", vae=base.vae)
    req = GenerationRequest(num_images=1, steps=STEPS, guidance=GUIDANCE, seed=SEED, height=SIZE, width=SIZE)
    dc = DeepCacheUNet(base.unet)
    unet = numpy_fn(graph_module("unet", unet=base.unet))

    def generate(unet_fn) -> tuple[np.ndarray, np.ndarray]:
        latents = denoise(unet_fn, dict(base.scheduler.config), cond, uncond, req, 4, base.latent_factor)
        return latents, numpy_fn(decoder)(latents)

    return {"dc": dc, "unet": unet, "generate": generate, "uncached": generate(unet)}


def test_interval_1_is_the_uncached_loop_bit_for_bit(sampling):
    dc, unet = sampling["dc"], sampling["unet"]
    full, shallow = numpy_fn(dc.full), numpy_fn(dc.shallow)
    assert step_cached(unet, full, shallow, 1) is unet
    cached = CachedUNet(full, shallow, 1)  # the cached path at interval 1: every step full
    latents, image = sampling["generate"](cached)
    assert (cached.full_calls, cached.shallow_calls) == (STEPS, 0)
    assert np.array_equal(latents, sampling["uncached"][0]) and np.array_equal(image, sampling["uncached"][1])


@pytest.mark.parametrize("interval", [2, 3])
def test_intervals_2_and_3_run_fewer_full_steps(sampling, sessions, interval):
    dc, (_, uncached) = sampling["dc"], sampling["uncached"]
    cached = step_cached(sampling["unet"], numpy_fn(dc.full), numpy_fn(dc.shallow), interval)
    _, image = sampling["generate"](cached)
    assert cached.full_calls == full_step_count(STEPS, interval) == math.ceil(STEPS / interval)
    assert cached.full_calls + cached.shallow_calls == STEPS  # one UNet batch (uncond + cond) per step
    psnr = psnr_uint8(image, uncached)
    diff = np.abs(image.astype(int) - uncached.astype(int))
    print(f"DeepCache interval {interval}, {STEPS} steps (tiny model, random weights): {cached.full_calls} full + "
          f"{cached.shallow_calls} shallow UNet calls; PSNR vs uncached {psnr:.2f} dB, "
          f"max |diff| {diff.max()}, mean {diff.mean():.3f} levels")
    assert math.isfinite(psnr)
    # the served graphs through the same loop give the torch cached image
    deep, shallow = sessions["unet_deep"], sessions["unet_shallow"]
    graphs = CachedUNet(lambda x, t, h: tuple(run(deep, {"sample": x, "timestep": t, "encoder_hidden_states": h})),
                        lambda x, t, h, f: run(shallow, {"sample": x, "timestep": t, "encoder_hidden_states": h,
                                                         "deep_feature": f})[0], interval)
    _, onnx_image = sampling["generate"](graphs)
    onnx_diff = np.abs(onnx_image.astype(int) - image.astype(int))
    print(f"  ONNX Runtime graphs vs torch at interval {interval}: max |diff| {onnx_diff.max()}, "
          f"mean {onnx_diff.mean():.4f} levels")
    assert onnx_diff.max() <= 2 and onnx_diff.mean() <= 0.01  # tests/test_diffusers_parity.py's pixel rule
