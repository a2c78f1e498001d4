"""The diffusion nets a repository serves: exported once, then judged, copied and described.

:class:`DiffusionSource` exports the runtime-LoRA text encoder, the VAE and
the runtime-LoRA UNet (with its step-cache shallow graph) of a base model
into a work folder (and, given ``tiny_vae``, the tiny autoencoder's
``vae_decoder_tiny`` / ``vae_encoder_tiny``: :mod:`facetron.export.tiny_vae`;
given ``distill_lora``, the few-step UNet ``unet_fewstep``: the base UNet with
that distillation LoRA merged in, :mod:`facetron.export.distill_lora`;
given ``inpaint_unet``, template mode's ``unet_inpaint``: a user's inpainting
UNet as the runtime-LoRA graph, :mod:`facetron.export.inpaint_unet`),
each under its served name and in its version folder's layout
(``<work>/unet/``, ``<work>/unet/shallow/``, ``<work>/text_encoder/``,
...: :data:`facetron.contract.MODEL_FILE` and the names beside it), and
gives the repository assembler (:mod:`facetron.export.repository`) what it
needs of them: each net's folder, the files of a version folder, the
generator's records, int8 and TensorRT variants, and for the measured
runtime choice (:mod:`facetron.export.runtime_choice`) the served feeds and
the torch oracles.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from facetron.atomic import atomic_write_json
from facetron.contract import CONTROL_FOLDER, CONTROLNET
from facetron.contract import (DEFAULT_DISTILL_WEIGHT, DISTILL_INFO, INT8_DEVIATION, INT8_FOLDER, MODEL_FILE,
                               MODEL_INFO, RUNTIME_LORA_UNETS, SCHEDULER_CONFIG, VOCAB_SIZE, SHALLOW_FOLDER, UNET,
                               UNET_FEWSTEP)
from facetron.contract import FEW_STEP_DEFAULT_GUIDANCE, FEW_STEP_DEFAULT_STEPS, FEW_STEP_SCHEDULERS
from facetron.contract import INPAINT_INFO, LORA_BANK_UNETS, UNET_INPAINT
from facetron.diffusion.base_model import load_base_model, model_hash
from facetron.export.controlnet import controlnet_info, export_controlnet_graphs, load_controlnet
from facetron.export.distill_lora import check_distill_weight, distill_info, fewstep_unet, load_distill_lora
from facetron.export.inpaint_unet import export_inpaint_unet, inpaint_unet_info, load_inpaint_unet
from facetron.export.model_configs import ModelDef
from facetron.export.onnx_export import ModelDims, export_model, export_onnx
from facetron.export.onnx_graph import MODELS, TINY_VAE_NETS, example_inputs, read_io
from facetron.export.runtime_choice import release
from facetron.export.runtime_lora import export_runtime_lora_text_encoder
from facetron.export.step_cache_graphs import export_runtime_lora_deep_cache_unet
from facetron.export.tiny_vae import load_tiny_vae, tiny_vae_info

#: the served nets whose graphs take runtime-LoRA inputs (``lora_manifest.json`` beside the graph)
RUNTIME_LORA_NETS = ("text_encoder",) + LORA_BANK_UNETS
#: the UNets ``--int8`` quantizes, each calibrated and judged on the path it serves (scheduler, steps, guidance of
#: :func:`facetron.export.quantize.calibration_feeds` / ``deviation_report``): the ``unet`` the defaults, the few-step
#: ``unet_fewstep`` a few-step request's defaults (lcm, 4 steps, guidance 1: no negative branch)
INT8_TRAJECTORIES: dict[str, dict] = {
    UNET.name: {},
    UNET_FEWSTEP.name: {"scheduler": FEW_STEP_SCHEDULERS[0], "steps": FEW_STEP_DEFAULT_STEPS,
                        "guidance": FEW_STEP_DEFAULT_GUIDANCE},
}


def copy_graph(src: Path, dest: Path) -> None:
    """An exported graph folder's files (graph, external weights, JSON records) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix in (".onnx", ".data", ".json"):
            shutil.copyfile(f, dest / f.name)


def load_base_part(path: Path, part: str):
    """One torch part of base model folder ``path`` (``unet`` | ``text_encoder`` | ``vae``), alone, as
    :func:`facetron.diffusion.base_model.load_base_model` loads it (float32, eval, no grad, local files only)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    cls = {"unet": UNet2DConditionModel, "text_encoder": CLIPTextModel, "vae": AutoencoderKL}[part]
    return cls.from_pretrained(path / part, local_files_only=True).eval().requires_grad_(False)


@dataclass
class DiffusionSource:
    """Where the diffusion models come from: a base model folder (None = the
    tiny embedded default) exported to ONNX during assembly; ``tiny_vae``: a
    diffusers ``AutoencoderTiny`` folder (TAESD) served beside the full VAE as
    ``vae_decoder_tiny`` / ``vae_encoder_tiny`` (None = none); ``distill_lora``:
    a distillation LoRA file (LCM-LoRA, TCD-LoRA, Hyper-SD; diffusers or kohya
    keys) merged at ``distill_weight`` into the base UNet served as
    ``unet_fewstep`` (None = none); ``controlnet``: a diffusers ``ControlNetModel``
    folder served as ``controlnet``, with the ``unet``'s graph that takes its
    residuals (``unet/control/``; :mod:`facetron.export.controlnet`; None = none); ``inpaint_unet``: a diffusers
    ``UNet2DConditionModel`` folder with the inpainting layout (9 input channels for SD-1.5) served as
    ``unet_inpaint``, template mode's UNet (:mod:`facetron.export.inpaint_unet`; None = none)."""

    base_model: Path | None = None
    lora_rank: int = 16  # runtime-LoRA rank (face + style LoRA ranks must fit)
    text_encoder_lora_rank: int = 32  # the runtime-LoRA text encoder's (FaceChain's text-encoder LoRA rank)
    tiny_vae: Path | None = None
    distill_lora: Path | None = None
    distill_weight: float = DEFAULT_DISTILL_WEIGHT
    controlnet: Path | None = None  # a diffusers ControlNetModel folder: served as controlnet (+ the unet's control graph)
    inpaint_unet: Path | None = None  # a diffusers 9-channel UNet2DConditionModel folder: served as unet_inpaint
    _exported: Path | None = None
    _dims: ModelDims | None = None
    _vocab: int = VOCAB_SIZE
    _info: dict | None = None
    _scheduler: dict | None = None
    _tiny: object | None = None  # the AutoencoderTiny (load_tiny_vae), when tiny_vae is given

    def export(self, work: Path) -> None:
        """Export the nets once into ``work`` (runtime-LoRA text encoder, VAE, runtime-LoRA UNet, the
        tiny autoencoder's decoder and encoder when ``tiny_vae`` is given, the few-step UNet when
        ``distill_lora`` is given)."""

        base = load_base_model(self.base_model)
        # the tiny autoencoder and the distillation LoRA checked against the base model before any export
        # (InvalidInputError: --tiny-vae, --distill-lora, --distill-weight)
        tiny = load_tiny_vae(self.tiny_vae, base) if self.tiny_vae is not None else None
        control = load_controlnet(self.controlnet, base) if self.controlnet is not None else None  # --controlnet
        inpaint = load_inpaint_unet(self.inpaint_unet, base) if self.inpaint_unet is not None else None  # --inpaint-unet
        distill = None
        if self.distill_lora is not None:
            self.distill_weight = check_distill_weight(self.distill_weight)
            distill = load_distill_lora(self.distill_lora, base)
        export_onnx(base, work, models=("vae_decoder", "vae_encoder"))
        if tiny is not None:
            for name in TINY_VAE_NETS:
                print(f"[export] {name} ...", flush=True)
                export_model(name, work, vae=tiny, dims=ModelDims.of(base))
        # the served UNet: the runtime-LoRA graph that also gives the step cache's deep feature, + its shallow graph
        export_runtime_lora_deep_cache_unet(base.unet, work, dims=ModelDims.of(base), rank=self.lora_rank)
        export_runtime_lora_text_encoder(base.text_encoder, work, dims=ModelDims.of(base),
                                         rank=self.text_encoder_lora_rank)
        if control is not None:  # the served controlnet + the unet's graph that takes its residuals (unet/control/)
            print(f"[export] {CONTROLNET.name} ({self.controlnet}) + {UNET.name}/{CONTROL_FOLDER} ...", flush=True)
            export_controlnet_graphs(control, base.unet, work, dims=ModelDims.of(base), rank=self.lora_rank)
        if distill is not None:  # the same graph over a copy of the base UNet with the distillation LoRA merged in
            print(f"[export] {UNET_FEWSTEP.name} (distillation LoRA {self.distill_lora} merged at "
                  f"{self.distill_weight:g}) ...", flush=True)
            merged = fewstep_unet(base, distill, self.distill_weight)
            export_runtime_lora_deep_cache_unet(merged, work, dims=ModelDims.of(base), rank=self.lora_rank,
                                                name=UNET_FEWSTEP.name)
            del merged
        if inpaint is not None:  # the runtime-LoRA graph (the unet's LoRA inputs) over the user's inpainting UNet
            print(f"[export] {UNET_INPAINT.name} ({self.inpaint_unet}) ...", flush=True)
            export_inpaint_unet(inpaint, work, dims=ModelDims.of(base), rank=self.lora_rank)
        self._exported = work
        self._tiny = tiny  # small (TAESD: ~10 MB): kept as the oracle of the tiny nets
        self._dims = ModelDims.of(base)
        self._vocab = int(base.text_encoder.config.vocab_size)
        self._scheduler = dict(base.scheduler.config)
        self._info = {
            "name": base.path.name,
            "path": str(base.path),
            "hash": model_hash(base.path),
            "is_smoke_model": base.is_smoke_model,
            "resolution": base.resolution,
            "latent_channels": int(base.vae.config.latent_channels),
            "latent_factor": base.latent_factor,
            "text_hidden": int(base.text_encoder.config.hidden_size),
            "lora_rank": self.lora_rank,
            "text_encoder_lora_rank": self.text_encoder_lora_rank,
            # a request's vae=tiny is served only where this names the tiny autoencoder (pipeline.job)
            "tiny_vae": tiny_vae_info(self.tiny_vae, tiny) if tiny is not None else None,
            # a request's control is served only where this names the ControlNet (pipeline.job)
            "controlnet": controlnet_info(self.controlnet, control) if control is not None else None,
            # a few-step request runs on unet_fewstep only where this names the distillation LoRA (pipeline.job)
            DISTILL_INFO: distill_info(distill, self.distill_weight) if distill is not None else None,
            # template-mode requests denoise on unet_inpaint only where this names the inpainting UNet (pipeline.job)
            INPAINT_INFO: inpaint_unet_info(self.inpaint_unet, inpaint) if inpaint is not None else None,
        }
        # no torch model outlives the export: the runtime choice loads the one part it judges when it judges
        # it (torch_net), so no torch copy of the base sits beside the runtimes it opens
        del base, control, distill, inpaint
        release()

    @property
    def nets(self) -> tuple[str, ...]:
        """The served nets exported here: text_encoder, unet, the VAEs (+ the tiny autoencoder's, + unet_fewstep)."""
        return (MODELS + (TINY_VAE_NETS if self.tiny_vae is not None else ())
                + ((UNET_FEWSTEP.name,) if self.distill_lora is not None else ())
                + ((CONTROLNET.name,) if self.controlnet is not None else ())
                + ((UNET_INPAINT.name,) if self.inpaint_unet is not None else ()))

    def net_folder(self, name: str) -> Path:
        """The exported folder of served net ``name``: ``<work>/<name>/`` (``unet`` and ``text_encoder``
        are the runtime-LoRA graphs)."""
        return self._exported / name

    def copy_net(self, name: str, version: Path) -> None:
        """Net ``name``'s graph files into its version folder; a runtime-LoRA UNet's (``unet``,
        ``unet_fewstep``) step-cache shallow graph into ``<version>/shallow/`` and its int8 IR, if
        made, into ``<version>/int8/``: the exported folder's layout (:data:`facetron.contract.SHALLOW_FOLDER`,
        :data:`~facetron.contract.INT8_FOLDER`)."""
        folder = self.net_folder(name)
        copy_graph(folder, version)
        if name in RUNTIME_LORA_UNETS:
            copy_graph(folder / SHALLOW_FOLDER, version / SHALLOW_FOLDER)
            if (folder / CONTROL_FOLDER).is_dir():  # the graph taking the ControlNet's residuals (--controlnet)
                copy_graph(folder / CONTROL_FOLDER, version / CONTROL_FOLDER)
            int8 = folder / INT8_FOLDER
            if int8.is_dir():  # the int8 IR (quantize_unet), whole
                shutil.copytree(int8, version / INT8_FOLDER)

    def quantize_unet(self, mode: str, name: str = UNET.name) -> dict:
        """Served runtime-LoRA UNet ``name`` (``unet`` | ``unet_fewstep``) as an int8 OpenVINO IR
        (:mod:`facetron.export.quantize`, ``mode``: weights | full | hybrid), calibrated on real trajectories of
        these nets with that UNet, into ``<export>/<name>/int8/`` with its ``quantization.json``; its deviation on
        held-out generations vs ONNX Runtime fp32 (and OpenVINO bf16's, the yardstick) goes into
        ``deviation.json`` beside it. The trajectories are the path each UNet serves (:data:`INT8_TRAJECTORIES`):
        the ``unet`` the default scheduler, steps and guidance; the ``unet_fewstep`` lcm, 4 steps, guidance 1.
        Returns the verdict."""
        from facetron.export.quantize import (ExportedNets, calibration_feeds, deviation_report, quantize_unet,
                                              within_tolerance)

        path = INT8_TRAJECTORIES[name]
        nets = ExportedNets.from_export(self._exported, self._scheduler, unet=name)
        out = self.net_folder(name) / INT8_FOLDER
        ir = quantize_unet(nets.unet, calibration_feeds(nets, **path), out, mode)
        report = deviation_report(nets, {mode: ir, "openvino_bf16": (nets.unet, "bf16")}, **path)
        verdict = within_tolerance(report, mode)
        atomic_write_json(out / INT8_DEVIATION, {"report": report, "verdict": verdict})
        print(f"[export] int8 {name} ({mode}): " + ("within" if verdict["pass"] else "OUTSIDE")
              + f" the tolerance ({verdict['rule']}); served because --int8 asked for it", flush=True)
        return verdict

    def write_generator_files(self, version: Path) -> None:
        atomic_write_json(version / MODEL_INFO, self._info)
        atomic_write_json(version / SCHEDULER_CONFIG, self._scheduler)

    def build_plan(self, model: ModelDef, version: Path) -> Path:
        """gpu target where TensorRT imports: ``model.plan`` (fp16) of net ``model``
        from its ONNX export, one optimization profile over batch 1..max_batch_size
        and every side a request may ask for (tuned at native), recorded with the TensorRT version and GPU
        it was built for (:data:`~facetron.export.trt.BUILD_RECORD`: a plan runs only there)."""
        from facetron.contract import MAX_SIDE_FACTOR, MIN_LATENT_SIDE
        from facetron.export.trt import (BUILD_RECORD, ENGINE_FILE, ProfileSizes, build_engine, import_tensorrt,
                                         profile_shapes)

        trt = import_tensorrt()
        native, factor = self._info["resolution"], self._info["latent_factor"]
        # every side a request may ask for (contract: MIN_LATENT_SIDE cells .. max_side_factor x native), tuned at native
        sizes = ProfileSizes(batch=(1, min(2, model.max_batch_size), model.max_batch_size),
                             image=(MIN_LATENT_SIDE * factor, native, int(MAX_SIDE_FACTOR * native) // factor * factor),
                             latent_factor=factor)
        inputs, _, _ = read_io(self.net_folder(model.name))
        shapes = profile_shapes(inputs, sizes)
        plan = build_engine(self.net_folder(model.name) / MODEL_FILE, version / ENGINE_FILE, shapes, fp16=True)
        gpu = None
        try:
            import torch

            gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        except Exception:  # noqa: BLE001 - the record is informative
            pass
        atomic_write_json(version / BUILD_RECORD, {"tensorrt": trt.__version__, "gpu": gpu, "fp16": True,
                                                   "profile": {k: [list(x) for x in v] for k, v in shapes.items()}})
        return plan

    def served_feed(self, name: str, seed: int = 0) -> dict[str, np.ndarray]:
        """Seeded inputs of net ``name`` at the shapes a native-size generation
        sends it: the UNet and text encoder a guidance pair (batch 2, the UNet
        with non-zero LoRA inputs), each VAE one image."""
        from facetron.diffusion.lora_inputs import random_lora_inputs, read_lora_manifest

        folder = self.net_folder(name)
        inputs, _, _ = read_io(folder)
        batch = 2 if name in RUNTIME_LORA_NETS else 1
        feed = example_inputs(inputs, self._dims, batch=batch, seed=seed, vocab=self._vocab)
        if name in RUNTIME_LORA_NETS:
            feed.update(random_lora_inputs(read_lora_manifest(folder), batch, seed=seed + 1))
        return feed

    @property
    def scheduler_config(self) -> dict:
        return dict(self._scheduler)

    @property
    def latent_factor(self) -> int:
        return int(self._info["latent_factor"])

    def torch_net(self, name: str):
        """(torch module, graph inputs) that served net ``name``'s graph computes (the runtime-LoRA
        UNet and text encoder for ``unet`` / ``text_encoder``): the oracle of the runtime choice. Loaded at
        each call — only the part of the base model it needs (:func:`load_base_part`), adapted in place —
        and not kept: the caller drops it, so no torch model sits beside the runtimes the choice opens."""
        from facetron.export.onnx_export import graph_module
        from facetron.export.runtime_lora import RuntimeLoraTextEncoder, RuntimeLoraUNet

        inputs, _, _ = read_io(self.net_folder(name))
        path = Path(self._info["path"])
        if name == "unet":
            module = RuntimeLoraUNet(load_base_part(path, "unet"), copy_net=False).eval()
        elif name == "text_encoder":
            module = RuntimeLoraTextEncoder(load_base_part(path, "text_encoder"), copy_net=False).eval()
        elif name in TINY_VAE_NETS:
            module = graph_module(name, vae=self._tiny)
        else:
            module = graph_module(name, vae=load_base_part(path, "vae"))
        return module, inputs

    def choose_runtimes(self, precision: str = "f32", threads: int | None = None, repeats: int = 3,
                        budget_s: float = 0.3, nets: Iterable[str] | None = None, *, cache: Path | None = None,
                        reuse: bool = True, rss=None) -> dict:
        """``auto``: per net (default: every served net, :attr:`nets`), the runtime (and with
        ``precision="auto"`` the precision) measured at the served shapes
        (:mod:`facetron.export.runtime_choice`). Returns the report written to :data:`RUNTIME_CHOICE_FILE`.
        ``unet_fewstep`` and ``unet_inpaint`` are not measured: they are the ``unet``'s graph with other weights
        (the inpainting one with 5 more input channels), and take the ``unet``'s choice (their entries say
        ``follows``). ``cache``, ``reuse``, ``rss``: the kept choices and the memory monitor
        (:func:`facetron.export.runtime_choice.choose_runtimes`)."""
        from facetron.export.runtime_choice import choose_runtimes

        followers = (UNET_FEWSTEP.name, UNET_INPAINT.name)
        wanted = tuple(self.nets if nets is None else nets)
        measured = tuple(dict.fromkeys(UNET.name if n in followers else n for n in wanted))
        report = choose_runtimes(self, measured, precision, threads, repeats, budget_s, cache=cache, reuse=reuse,
                                 rss=rss)
        for name in followers:
            if name in wanted:
                report[name] = dict(report[UNET.name], follows=UNET.name)
        return {n: report[n] for n in wanted}
