"""int8 UNet for OpenVINO: weight compression, or post-training quantization of
weights *and* activations calibrated on real denoising trajectories.

The served UNet is the runtime-LoRA graph (``unet/model.onnx`` of the
assembler's export, ``unet_lora/model.onnx`` of ``export onnx``: every
user's LoRA given as graph inputs). Three modes, each an OpenVINO IR
(``model.xml`` + ``model.bin``) that :func:`facetron.net_runtimes.open_runtime`
opens like the ONNX file (``read_model`` reads both):

* ``weights``: ``nncf.compress_weights`` (int8 per-channel weights, f32
  activations; no data). The ``openvino_int8w`` rows of ``benchmarks/runtimes.py``.
* ``full``: ``nncf.quantize`` of every op NNCF quantizes (Convolution,
  weighted MatMul, attention's activation x activation MatMuls, ...):
  int8 weights and int8 activations, ``ModelType.TRANSFORMER``,
  ``QuantizationPreset.MIXED`` (symmetric weights, asymmetric activations),
  SmoothQuant off (see :data:`FULL_PARAMETERS`).
* ``hybrid``: the recipe OpenVINO's Stable Diffusion notebooks and
  optimum-intel (``_hybrid_quantization``) apply to SD UNets, because full
  post-training int8 alone hurt their image quality: int8 weight compression
  of the weighted MatMuls (activations f32 there), full int8 (weights +
  activations) of the Convolutions and of the remaining (attention) MatMuls,
  SmoothQuant off.

In ``full`` and ``hybrid`` the **LoRA MatMuls stay f32** (``x @ A``,
``t @ B``, :func:`lora_matmuls`): their second operand is a user's LoRA, a
graph input whose range differs per user, so an activation range calibrated
on one LoRA would clip another's. The rest of the graph sees the LoRA only
through the projections' sums (a small delta on the base model's output).

Calibration data (:func:`calibration_feeds`) are the UNet's inputs recorded
from real generations: facetron's sampler (:func:`facetron.diffusion.sampler.denoise`,
the served loop) over the exported nets in ONNX Runtime fp32, a few prompts x
seeds, the default scheduler and steps, guidance (batch 2: unconditional +
conditional), a fixed random non-zero LoRA: every step's ``sample``,
``timestep``, ``encoder_hidden_states`` and LoRA inputs as the UNet got them.
The scheduler, steps and guidance are arguments: the few-step UNet
(``unet_fewstep``) is calibrated and judged on its own path (lcm, 4 steps,
guidance 1: batch 1, no negative branch).

:func:`deviation_report` measures, on *held-out* prompts and seeds, each
quantized UNet against ONNX Runtime fp32: per step (the UNet's output on the
fp32 trajectory's inputs: relative L2 and max abs) and per final image (a
whole generation with the quantized UNet on the same seed and steps: PSNR of
the uint8 image, relative L2 of the final latents).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from facetron import contract
from facetron.atomic import atomic_dir, atomic_write_json, check_replaceable
from facetron.errors import InvalidInputError
from facetron.deviation import psnr_uint8, rel_l2
from facetron.export.runtime_choice import BF16_FACTOR

MODES = ("weights", "full", "hybrid")
#: an export's runtime-LoRA UNet folders, served first: the served ``unet`` (the step cache's full graph, noise_pred
#: + deep_feature), else the runtime-LoRA graph of ``export onnx``; a folder counts where it has a LoRA manifest
#: (``export onnx``'s ``unet/`` is the plain UNet)
UNET_FOLDERS = (contract.UNET.name, "unet_lora")
IR_FILE = "model.xml"
REPORT_FILE = "quantization.json"
#: calibration: portrait prompts in the style of the served ones (the trajectories, not the words, matter)
CALIBRATION_PROMPTS = (
    "a photo of a woman, solo, upper body, studio portrait, soft light, high detail",
    "a photo of a man in a suit, office background, professional headshot, sharp focus",
    "portrait of a person outdoors, golden hour, shallow depth of field, film grain",
    "close-up portrait of a smiling child, bright colors, natural light",
)
CALIBRATION_SEEDS = (0,)
#: held out: prompts and seeds no calibration trajectory used
HELD_OUT_PROMPTS = (
    "a photo of an old man with a beard, black and white, dramatic lighting",
    "a woman in a red dress in a garden, spring, bokeh, high detail",
)
HELD_OUT_SEEDS = (1000,)
NEGATIVE = "blurry, lowres, bad anatomy, extra fingers, watermark"
#: the LoRA of every calibration / deviation trajectory: random_lora_inputs at the export rank, this seed
LORA_SEED = 1
#: nncf.quantize settings of ``full`` / ``hybrid`` (beside ``subset_size`` = the number of calibration feeds)
FULL_PARAMETERS = {"model_type": "transformer", "preset": "mixed", "smooth_quant": "off",
                   "fast_bias_correction": True}
#: a default int8 may deviate from fp32 at most this many times as much as OpenVINO bf16 does
#: (:func:`within_tolerance`; the factor ``--precision auto`` allows bf16 against torch's bf16)
TOLERANCE_FACTOR = BF16_FACTOR
#: ops the LoRA operands pass through between their graph input and the MatMul that reads them
_SHAPE_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Convert", "Gather", "Slice", "StridedSlice",
                        "Split", "VariadicSplit", "Concat"})


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise InvalidInputError("int8 mode", f"expected one of {', '.join(MODES)}, got {mode!r}")
    return mode


# ----------------------------------------------------------------------------- the exported nets


@dataclass
class ExportedNets:
    """The exported graphs a generation runs (ONNX files) and what the loop needs to know about them.

    ``unet``: the runtime-LoRA UNet (``lora_manifest.json`` beside it);
    ``text_encoder``: the plain or the runtime-LoRA text encoder (fed a zero
    LoRA: the base model's embeddings); ``vae_decoder``: only for the
    per-image deviation."""

    unet: Path
    text_encoder: Path
    vae_decoder: Path | None
    scheduler_config: dict
    resolution: int
    latent_channels: int = 4
    latent_factor: int = 8

    @classmethod
    def from_export(cls, onnx_dir: str | os.PathLike, scheduler_config: Mapping | None = None,
                    unet: str | None = None) -> "ExportedNets":
        """The nets of an export folder (``export_onnx`` + the runtime-LoRA graphs): the UNet of folder
        ``unet`` (default: the first of :data:`UNET_FOLDERS` there with a LoRA manifest), ``text_encoder``
        (runtime-LoRA or plain), ``vae_decoder`` if there; resolution and latent shape from
        ``export_manifest.json``; ``scheduler_config`` default: SD-1.5's (DDPM, scaled linear)."""
        from facetron.contract import MODEL_FILE
        from facetron.diffusion.lora_inputs import MANIFEST_FILE
        from facetron.export.onnx_export import read_manifest

        onnx_dir = Path(onnx_dir)
        dims = read_manifest(onnx_dir)["dims"]
        vae = onnx_dir / "vae_decoder" / MODEL_FILE
        unet = unet or next((f for f in UNET_FOLDERS if (onnx_dir / f / MANIFEST_FILE).is_file()), UNET_FOLDERS[-1])
        return cls(unet=onnx_dir / unet / MODEL_FILE,
                   text_encoder=onnx_dir / contract.TEXT_ENCODER.name / MODEL_FILE,
                   vae_decoder=vae if vae.is_file() else None,
                   scheduler_config=dict(scheduler_config) if scheduler_config else sd15_scheduler_config(),
                   resolution=int(dims["latent_size"]) * int(dims["latent_factor"]),
                   latent_channels=int(dims["latent_channels"]), latent_factor=int(dims["latent_factor"]))

    def lora(self, batch: int = 2, seed: int = LORA_SEED) -> dict[str, np.ndarray]:
        """The fixed random non-zero LoRA of the trajectories (export rank, ``batch`` rows)."""
        from facetron.diffusion.lora_inputs import MANIFEST_FILE, random_lora_inputs, read_lora_manifest

        if not (self.unet.parent / MANIFEST_FILE).is_file():  # the plain UNet graph: no LoRA inputs
            return {}
        return random_lora_inputs(read_lora_manifest(self.unet.parent), batch, seed=seed)


def guided_batch(guidance: float) -> int:
    """The UNet's batch per call of a 1-image generation: 2 with guidance (unconditional + conditional),
    1 at guidance <= 1 (no negative branch: :func:`facetron.diffusion.sampler.denoise`, the few-step path)."""
    return 2 if guidance > 1.0 else 1


def sd15_scheduler_config() -> dict:
    from diffusers import DDPMScheduler

    from facetron.diffusion.model_spec import SD15_SCHEDULER

    return dict(DDPMScheduler(**SD15_SCHEDULER).config)


def _text_encoder(path: Path, threads: int | None):
    """ids -> embeddings in ONNX Runtime fp32 (a runtime-LoRA text encoder gets a zero LoRA: the base net)."""
    from facetron.diffusion.lora_inputs import MANIFEST_FILE, read_lora_manifest, zero_lora_inputs
    from facetron.net_runtimes import open_runtime

    net = open_runtime(path, "onnxruntime", threads)
    extra = {}
    if (path.parent / MANIFEST_FILE).is_file():
        manifest = read_lora_manifest(path.parent)
        extra = zero_lora_inputs(manifest)

    def encode(ids: np.ndarray) -> np.ndarray:
        batch = {k: np.repeat(v, len(ids), 0) for k, v in extra.items()}
        return net.run(["last_hidden_state"], {"input_ids": ids, **batch})[0]

    return encode


def unet_callable(net, lora: Mapping[str, np.ndarray]):
    """``denoise``'s ``unet(sample, t, hidden)`` over an opened runtime-LoRA UNet and a fixed LoRA."""
    def unet(sample: np.ndarray, t: np.ndarray, hidden: np.ndarray) -> np.ndarray:
        return net.run(["noise_pred"], {"sample": sample, "timestep": t, "encoder_hidden_states": hidden, **lora})[0]

    return unet


def _request(nets: ExportedNets, seed: int, steps: int, guidance: float, scheduler: str):
    from facetron.diffusion.sampler import GenerationRequest

    req = GenerationRequest(num_images=1, steps=steps, guidance=guidance, seed=seed, height=nets.resolution,
                            width=nets.resolution, scheduler=scheduler)
    req.validate(nets.latent_factor)
    return req


@functools.cache
def _tokenizer():
    from facetron.diffusion.clip_tokenizer import ClipTokenizer

    return ClipTokenizer()


def _trajectory(nets: ExportedNets, unet, encode, prompt: str, seed: int, steps: int, guidance: float,
                scheduler: str, record: list | None = None) -> np.ndarray:
    """Final latents of one generation (``denoise``: the served loop); with ``record`` every UNet call's
    inputs and output ((sample, timestep, hidden), noise_pred) are appended to it."""
    from facetron.diffusion.sampler import denoise

    hidden = encode(_tokenizer()([prompt, NEGATIVE]))
    cond, uncond = hidden[:1], hidden[1:2]

    def recorded(sample, t, h):
        out = unet(sample, t, h)
        if record is not None:
            record.append(((sample.copy(), t.copy(), h), out))
        return out

    return denoise(recorded, nets.scheduler_config, cond, uncond, _request(nets, seed, steps, guidance, scheduler),
                   nets.latent_channels, nets.latent_factor)


# ----------------------------------------------------------------------------- calibration


@dataclass
class Calibration:
    """UNet feeds recorded from denoising trajectories, and how they were made."""

    feeds: list[dict[str, np.ndarray]]
    prompts: list[str]
    seeds: list[int]
    steps: int
    scheduler: str
    guidance: float
    lora: str
    shapes: dict = field(default_factory=dict)

    def info(self) -> dict:
        """Everything but the feeds (what ``quantization.json`` records)."""
        return {"prompts": self.prompts, "seeds": self.seeds, "steps": self.steps, "scheduler": self.scheduler,
                "guidance": self.guidance, "lora": self.lora, "shapes": self.shapes, "samples": len(self.feeds)}


def calibration_feeds(nets: ExportedNets, prompts: Sequence[str] = CALIBRATION_PROMPTS,
                      seeds: Sequence[int] = CALIBRATION_SEEDS, steps: int = contract.DEFAULT_STEPS, *,
                      guidance: float = contract.DEFAULT_GUIDANCE, scheduler: str = contract.DEFAULT_SCHEDULER,
                      lora: Mapping[str, np.ndarray] | None = None, threads: int | None = None) -> Calibration:
    """The runtime-LoRA UNet's inputs at every step of ``len(prompts) x len(seeds)`` generations
    (ONNX Runtime fp32, :func:`facetron.diffusion.sampler.denoise`), one 1-image generation each, with
    guidance: batch 2 per call (batch 1 at ``guidance`` <= 1: :func:`guided_batch`). ``lora``: the UNet's LoRA
    inputs (that batch; default: a fixed random non-zero LoRA at the export rank, :meth:`ExportedNets.lora`); the
    same arrays in every feed."""
    from facetron.net_runtimes import open_runtime

    lora_label = "given" if lora is not None else f"random_lora_inputs(seed={LORA_SEED}, export rank)"
    lora = dict(lora) if lora is not None else nets.lora(guided_batch(guidance))
    unet = unet_callable(open_runtime(nets.unet, "onnxruntime", threads), lora)
    encode = _text_encoder(nets.text_encoder, threads)
    feeds: list[dict[str, np.ndarray]] = []
    for prompt in prompts:
        for seed in seeds:
            record: list = []
            _trajectory(nets, unet, encode, prompt, int(seed), steps, guidance, scheduler, record)
            feeds += [{"sample": s, "timestep": t, "encoder_hidden_states": h, **lora} for (s, t, h), _ in record]
    shapes = {k: list(v.shape) for k, v in feeds[0].items() if not k.startswith("lora_")} if feeds else {}
    return Calibration(feeds, list(prompts), [int(s) for s in seeds], steps, scheduler, guidance, lora_label, shapes)


# ----------------------------------------------------------------------------- quantization


def _matmuls_reading(model, skip: frozenset | tuple, source) -> list[str]:
    """Friendly names of the MatMuls with an operand that is ``source(node)`` once the ops of
    ``skip`` are looked through."""
    names = []
    for op in model.get_ops():
        if op.get_type_name() != "MatMul":
            continue
        for port in range(2):
            node = op.input_value(port).get_node()
            while node.get_type_name() in skip:
                node = node.input_value(0).get_node()
            if source(node):
                names.append(op.get_friendly_name())
                break
    return names


def lora_matmuls(model) -> list[str]:
    """Friendly names of the MatMuls that read a LoRA graph input (``lora_*``), through shape-only ops."""
    return _matmuls_reading(model, _SHAPE_OPS, lambda n: n.get_type_name() == "Parameter"
                            and n.get_friendly_name().startswith("lora_"))


def weighted_matmuls(model) -> list[str]:
    """Friendly names of the MatMuls with a constant operand (a linear layer's weight), as
    optimum-intel's hybrid mode finds them (through Convert / FakeQuantize / Reshape)."""
    return _matmuls_reading(model, ("Convert", "FakeQuantize", "Reshape"), lambda n: n.get_type_name() == "Constant")


def quantize_model(model, feeds: Sequence[Mapping[str, np.ndarray]] | None, mode: str = "full",
                   subset_size: int | None = None) -> tuple[object, dict]:
    """(int8 ``ov.Model``, the parameters used) of ``model`` (an ``ov.Model`` of the runtime-LoRA UNet):
    see the module doc for the modes. ``feeds``: the calibration inputs (``full`` / ``hybrid``)."""
    check_mode(mode)
    with _quiet_nncf():
        return _quantize(model, feeds, mode, subset_size)


@contextmanager
def _quiet_nncf():
    """NNCF logs a line per ignored or skipped node at INFO: warnings only while it works here."""
    import nncf
    from nncf.common.logging import nncf_logger

    level = nncf_logger.level
    nncf.set_log_level(logging.WARNING)
    try:
        yield
    finally:
        nncf.set_log_level(level)


def _quantize(model, feeds, mode: str, subset_size: int | None) -> tuple[object, dict]:
    import nncf

    lora = lora_matmuls(model)
    params: dict = {"mode": mode, "lora_matmuls_kept_f32": len(lora)}
    if mode == "weights":
        params["compress_weights"] = {"mode": "int8_asym", "per_channel": True}
        return nncf.compress_weights(model), params
    if not feeds:
        raise InvalidInputError("calibration feeds", f"int8 mode {mode!r} needs calibration data")
    ignored = list(lora)
    if mode == "hybrid":
        weighted = [n for n in weighted_matmuls(model) if n not in set(lora)]
        convolutions = nncf.IgnoredScope(types=["Convolution"], names=lora, validate=False)  # full int8 below
        model = nncf.compress_weights(model, ignored_scope=convolutions)
        ignored += weighted
        params["compress_weights"] = {"mode": "int8_asym", "per_channel": True, "ops": f"{len(weighted)} MatMuls"}
    subset = min(subset_size or len(feeds), len(feeds))
    # NNCF takes the first ``subset`` items: spread them over every trajectory and step instead
    picked = [feeds[i] for i in np.linspace(0, len(feeds) - 1, subset).round().astype(int)]
    quantized = nncf.quantize(
        model, nncf.Dataset(picked), subset_size=subset, model_type=nncf.ModelType.TRANSFORMER,
        preset=nncf.QuantizationPreset.MIXED, fast_bias_correction=FULL_PARAMETERS["fast_bias_correction"],
        ignored_scope=nncf.IgnoredScope(names=ignored, validate=False),
        advanced_parameters=nncf.AdvancedQuantizationParameters(
            smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(convolution=-1, matmul=-1)))
    params.update({"quantize": dict(FULL_PARAMETERS, subset_size=subset), "ignored_ops": len(ignored)})
    return quantized, params


def quantize_unet(onnx_path: str | os.PathLike, feeds: Calibration | Sequence[Mapping[str, np.ndarray]] | None,
                  out_dir: str | os.PathLike, mode: str = "full", *, subset_size: int | None = None) -> Path:
    """Quantize the runtime-LoRA UNet ``onnx_path`` (``mode``: see the module doc) and write
    ``out_dir/{model.xml, model.bin, quantization.json}`` atomically (built in a temp folder, then
    renamed; ``out_dir`` must be new, empty or made by facetron). The IR keeps the ONNX graph's dynamic
    shapes (the served runtime compiles a static graph per feed shape); weights stay f32 where not int8
    (``compress_to_fp16=False``). Returns the IR's path."""
    import nncf
    import openvino as ov

    from facetron.net_runtimes import openvino_model

    check_mode(mode)
    check_replaceable(out_dir, "int8 UNet folder")  # before minutes of work
    calibration = feeds if isinstance(feeds, Calibration) else None
    feed_list = calibration.feeds if calibration is not None else (list(feeds) if feeds is not None else None)
    t0 = time.perf_counter()
    model, params = quantize_model(openvino_model(Path(onnx_path)), feed_list, mode, subset_size)
    quantize_s = time.perf_counter() - t0
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, "int8 UNet folder") as tmp:
        ov.save_model(model, str(tmp / IR_FILE), compress_to_fp16=False)
        report = {"source": str(Path(onnx_path).resolve()), "file": IR_FILE, **params,
                  "quantize_s": round(quantize_s, 1), "ops": quantize_ops(model),
                  "versions": {"nncf": nncf.__version__, "openvino": ov.get_version()},
                  "calibration": calibration.info() if calibration is not None
                  else ({"samples": len(feed_list)} if feed_list else None)}
        atomic_write_json(tmp / REPORT_FILE, report)
    return out_dir / IR_FILE


def quantize_ops(model) -> dict[str, int]:
    """How many quantize / int8 nodes ``model`` holds: FakeQuantize, FakeConvert, and u8/i8 constants."""
    counts = {"FakeQuantize": 0, "FakeConvert": 0, "int8_constants": 0}
    for op in model.get_ops():
        kind = op.get_type_name()
        if kind in ("FakeQuantize", "FakeConvert"):
            counts[kind] += 1
        elif kind == "Constant" and op.get_output_element_type(0).get_type_name() in ("u8", "i8"):
            counts["int8_constants"] += 1
    return counts


# ----------------------------------------------------------------------------- deviation


def _dev(got: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(rel L2, max abs) of ``got`` vs ``ref``."""
    return rel_l2(got, ref), float(np.abs(np.asarray(got, np.float64) - np.asarray(ref, np.float64)).max())


def deviation_report(nets: ExportedNets, variants: Mapping[str, str | os.PathLike | tuple],
                     prompts: Sequence[str] = HELD_OUT_PROMPTS, seeds: Sequence[int] = HELD_OUT_SEEDS,
                     steps: int = contract.DEFAULT_STEPS, *, guidance: float = contract.DEFAULT_GUIDANCE,
                     scheduler: str = contract.DEFAULT_SCHEDULER, lora: Mapping[str, np.ndarray] | None = None,
                     threads: int | None = None) -> dict:
    """Each variant's UNet against ONNX Runtime fp32 on held-out generations (``prompts`` x ``seeds``).

    ``variants``: name -> an IR or ONNX file, or (file, precision) (``bf16``: OpenVINO's bf16 hint, the
    yardstick of :func:`within_tolerance`), each opened in OpenVINO as a served model opens it
    (``open_runtime``: a static graph per feed shape, ``reuse_inputs``). Per variant:

    * ``per_step``: per step, the UNet's output on the fp32 trajectory's inputs (rel L2, max abs),
      and over all steps the mean / max (``step_rel_l2_mean``, ``step_rel_l2_max``, ``step_max_abs``);
    * ``per_image``: a whole generation with the variant's UNet vs fp32 (same seed and steps):
      PSNR (dB; None = identical) and max abs of the uint8 image (``vae_decoder`` in ONNX Runtime
      fp32), rel L2 and max abs of the final latents;
    * ``ms_per_step``: the median UNet call (one batch-2 guidance step) in those runs (not interleaved
      with the others: ``benchmarks/runtimes.py`` gives the ratios)."""
    from facetron.net_runtimes import open_runtime

    if nets.vae_decoder is None:
        raise InvalidInputError("vae_decoder", "the per-image deviation needs the exported vae_decoder")
    lora_label = "given" if lora is not None else f"random_lora_inputs(seed={LORA_SEED}, export rank)"
    lora = dict(lora) if lora is not None else nets.lora(guided_batch(guidance))
    encode = _text_encoder(nets.text_encoder, threads)
    vae = open_runtime(nets.vae_decoder, "onnxruntime", threads)

    def decode(latent: np.ndarray) -> np.ndarray:
        return vae.run(["images"], {"latent": latent})[0]

    fp32 = unet_callable(open_runtime(nets.unet, "onnxruntime", threads), lora)
    refs = []
    for prompt in prompts:
        for seed in seeds:
            record: list = []
            latents = _trajectory(nets, fp32, encode, prompt, int(seed), steps, guidance, scheduler, record)
            refs.append({"prompt": prompt, "seed": int(seed), "feeds": [f for f, _ in record],
                         "outputs": [out for _, out in record], "latents": latents, "image": decode(latents)})
    report: dict = {"reference": "onnxruntime fp32 (the validated export)", "prompts": list(prompts),
                    "seeds": [int(s) for s in seeds], "steps": steps, "scheduler": scheduler, "guidance": guidance,
                    "lora": lora_label, "variants": {}}
    for name, spec in variants.items():
        path, precision = (spec if isinstance(spec, tuple) else (spec, "f32"))
        net = open_runtime(Path(path), "openvino", threads, cache=False, fallback=False, reuse_inputs=True,
                           precision=precision)
        report["variants"][name] = _variant_deviation(nets, unet_callable(net, lora), refs, encode, decode, steps,
                                                      guidance, scheduler)
        report["variants"][name].update(file=str(path), precision=precision)
        del net
    return report


def _variant_deviation(nets: ExportedNets, unet, refs: list[dict], encode, decode, steps: int, guidance: float,
                       scheduler: str) -> dict:
    times: list[float] = []

    def timed(*args):
        t0 = time.perf_counter()
        out = unet(*args)
        times.append(time.perf_counter() - t0)
        return out

    unet(*refs[0]["feeds"][0])  # compiles this shape's static graph (not timed)
    per_step, per_image = [], []
    for ref in refs:
        devs = [_dev(timed(*f), out) for f, out in zip(ref["feeds"], ref["outputs"])]
        per_step.append({"prompt": ref["prompt"], "seed": ref["seed"], "rel_l2": [round(r, 6) for r, _ in devs],
                         "max_abs": [round(m, 6) for _, m in devs]})
        latents = _trajectory(nets, timed, encode, ref["prompt"], ref["seed"], steps, guidance, scheduler)
        image = decode(latents)
        lat_rel, lat_max = _dev(latents, ref["latents"])
        psnr = psnr_uint8(image, ref["image"])
        per_image.append({"prompt": ref["prompt"], "seed": ref["seed"],
                          "psnr_db": None if math.isinf(psnr) else round(psnr, 2),
                          "image_max_abs": int(np.abs(image.astype(np.int16) - ref["image"].astype(np.int16)).max()),
                          "latents_rel_l2": round(lat_rel, 6), "latents_max_abs": round(lat_max, 6)})
    rel = [r for s in per_step for r in s["rel_l2"]]
    psnrs = [i["psnr_db"] for i in per_image if i["psnr_db"] is not None]
    return {"ms_per_step": round(1e3 * float(np.median(times)), 2),
            "step_rel_l2_mean": round(float(np.mean(rel)), 6), "step_rel_l2_max": round(float(np.max(rel)), 6),
            "step_max_abs": round(max(m for s in per_step for m in s["max_abs"]), 6),
            "image_psnr_db_min": min(psnrs) if psnrs else None,
            "latents_rel_l2_max": max(i["latents_rel_l2"] for i in per_image),
            "per_step": per_step, "per_image": per_image}


def within_tolerance(report: dict, variant: str, yardstick: str = "openvino_bf16", factor: float = TOLERANCE_FACTOR
                     ) -> dict:
    """Whether ``variant`` of a :func:`deviation_report` may be a default: its per-step deviation (mean and
    max rel L2) and its final latents' rel L2 at most ``factor`` x those of ``yardstick`` (OpenVINO bf16:
    the reduced precision OpenVINO itself defaults to on AMX CPUs, and still opt-in in facetron), on the
    same held-out trajectories. Returns {"pass", "rule", per-metric values}."""
    got, ref = report["variants"][variant], report["variants"][yardstick]
    checks = {k: {"value": got[k], "limit": round(factor * ref[k], 6), "pass": got[k] <= factor * ref[k]}
              for k in ("step_rel_l2_mean", "step_rel_l2_max", "latents_rel_l2_max")}
    return {"pass": all(c["pass"] for c in checks.values()), "checks": checks,
            "rule": f"{variant}: per-step rel L2 (mean, max) and final-latent rel L2 <= {factor:g} x {yardstick}'s, "
                    "vs ONNX Runtime fp32 on held-out trajectories"}
