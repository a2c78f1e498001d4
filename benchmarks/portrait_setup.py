"""What every variant of ``facetron bench portrait`` shares (:mod:`facetron.benchmarks.portrait_e2e`):
the request (prompt, negative prompt, seed, warm-up steps), the face LoRA, the exported graphs and the
per-stage clock."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from facetron import contract

WARMUP_STEPS = 2
PROMPT = "a photo of a woman, solo, upper body, studio portrait, soft light, high detail"
NEGATIVE = "blurry, lowres, bad anatomy, extra fingers, watermark"
SEED = 0
#: the face LoRA: FaceChain's trained shape (UNet rank 4, alpha 32) plus text-encoder layers (rank 4) so the
#: runtime-LoRA text encoder gets non-zero inputs too; small B (random weights: any non-zero LoRA will do)
LORA = dict(rank=4, alpha=32.0, te_rank=4, te_alpha=32.0, std=0.001, seed=7)


class StageClock:
    """Seconds and calls per stage: callables wrapped by :meth:`wrap`, torch modules hooked by :meth:`hook`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._started: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] += seconds
        self.calls[stage] += 1

    def wrap(self, stage: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(stage, time.perf_counter() - t0)

        return timed

    def hook(self, stage: str, module) -> list:
        """Forward pre/post hooks timing every call of torch ``module``; returns the handles."""
        def start(*_):
            self._started[stage] = time.perf_counter()

        def stop(*_):
            self.add(stage, time.perf_counter() - self._started.pop(stage))

        return [module.register_forward_pre_hook(start), module.register_forward_hook(stop)]

    def stages(self, total_s: float, steps: int) -> dict:
        """The stage breakdown of one image (``other_s``: what no stage covers)."""
        te, unet, vae = (self.seconds.get(k, 0.0) for k in ("text_encode", "unet", "vae_decode"))
        return {"total_s": round(total_s, 3), "text_encode_s": round(te, 3), "unet_s": round(unet, 3),
                "unet_s_per_step": round(unet / steps, 4), "unet_calls": self.calls.get("unet", 0),
                "vae_decode_s": round(vae, 3), "other_s": round(total_s - te - unet - vae, 3)}


# ----------------------------------------------------------------------------- setup: nets, LoRA, graphs


@dataclass
class Setup:
    """What every variant shares: the exported graphs, the LoRA, the request."""

    work: Path  # the temporary folder: graphs/ (the exported graphs), the LoRA file, tokenizer/
    spec: str
    resolution: int
    latent_channels: int
    latent_factor: int
    scheduler_config: dict
    lora_path: Path
    unet_lora: dict  # the runtime-LoRA UNet's LoRA inputs (batch 2: a guidance pair), the same arrays every call
    te_lora: dict  # the runtime-LoRA text encoder's (batch 2: prompt + negative prompt)
    seed: int = SEED
    unet_lora_single: dict | None = None  # batch 1: a few-step request at guidance 1 (no negative branch)

    def request(self, steps: int, cache_interval: int = 1, few_step: bool = False):
        """The benchmark's request: ``contract.DEFAULT_SCHEDULER`` at ``DEFAULT_GUIDANCE``, or (``few_step``)
        LCM at ``FEW_STEP_DEFAULT_GUIDANCE`` (1: a batch-1 UNet per step), the served few-step defaults."""
        from facetron.diffusion.sampler import GenerationRequest

        scheduler, guidance = (("lcm", contract.FEW_STEP_DEFAULT_GUIDANCE) if few_step else
                               (contract.DEFAULT_SCHEDULER, contract.DEFAULT_GUIDANCE))
        req = GenerationRequest(num_images=1, steps=steps, guidance=guidance, seed=self.seed,
                                height=self.resolution, width=self.resolution, scheduler=scheduler,
                                cache_interval=cache_interval)
        req.validate(self.latent_factor)
        return req

    def graph(self, net: str) -> Path:
        """The ONNX file of served net ``net``: ``graphs/<net>/`` (exported under the served names, as the
        repository assembler exports them: ``unet`` and ``text_encoder`` are the runtime-LoRA graphs, the
        ``unet`` graph also gives the step cache's feature)."""
        return self.work / "graphs" / net / contract.MODEL_FILE

    def shallow_graph(self) -> Path:
        """The ONNX file of the step cache's shallow graph: ``graphs/unet/shallow/``, as in the version folder."""
        return self.work / "graphs" / contract.UNET.name / contract.SHALLOW_FOLDER / contract.MODEL_FILE

    def control_graph(self) -> Path:
        """The ONNX file of the runtime-LoRA UNet taking a ControlNet's residuals: ``graphs/unet/control/``."""
        return self.work / "graphs" / contract.UNET.name / contract.CONTROL_FOLDER / contract.MODEL_FILE


def prepare(spec: str, work: Path, seed: int = SEED, *, tiny_vae: bool = False, controlnet: bool = False):
    """(torch nets of ``spec`` with random weights, :class:`Setup`): the face LoRA written, the served graphs
    exported as the repository assembler exports them (``DiffusionSource``'s ranks), the LoRA inputs built.
    ``tiny_vae``: also ``graphs/vae_decoder_tiny/`` from a random ``AutoencoderTiny`` of TAESD's shapes;
    ``controlnet``: also ``graphs/controlnet/`` and ``graphs/unet/control/`` from a random ``ControlNetModel``
    of the UNet's shapes (diffusers' default conditioning embedding), as ``export repository --tiny-vae`` /
    ``--controlnet`` export them."""
    from diffusers import DDPMScheduler

    from facetron.benchmarks.runtimes import _nets
    from facetron.diffusion.lora_inputs import lora_inputs_for, read_lora_manifest
    from facetron.diffusion.model_spec import SD15_SCHEDULER
    from facetron.export.onnx_export import export_onnx
    from facetron.export.onnx_graph import ModelDims
    from facetron.export.diffusion_source import DiffusionSource
    from facetron.export.runtime_lora import export_runtime_lora_text_encoder
    from facetron.export.step_cache_graphs import export_runtime_lora_deep_cache_unet
    from facetron.training.random_lora import write_random_lora

    base, dims = _nets(spec)
    lora = write_random_lora(work / "face.safetensors", base.unet, rank=LORA["rank"], alpha=LORA["alpha"],
                             seed=LORA["seed"], std=LORA["std"], text_encoder=base.text_encoder,
                             te_rank=LORA["te_rank"], te_alpha=LORA["te_alpha"])
    graphs = work / "graphs"
    export_onnx(base, graphs, models=("vae_decoder",))
    export_runtime_lora_deep_cache_unet(base.unet, graphs, dims=ModelDims.of(base), rank=DiffusionSource.lora_rank)
    export_runtime_lora_text_encoder(base.text_encoder, graphs, dims=ModelDims.of(base),
                                     rank=DiffusionSource.text_encoder_lora_rank)
    if tiny_vae:
        export_tiny_decoder(base, graphs, work / "taesd_random")
    if controlnet:
        export_random_controlnet(base, graphs, work / "controlnet_random")
    w_face = contract.UnetParams().w_face
    manifest = read_lora_manifest(graphs / contract.UNET.name)
    setup = Setup(work=work, spec=spec, resolution=int(base.resolution), latent_channels=dims.latent_channels,
                  latent_factor=dims.latent_factor, scheduler_config=dict(DDPMScheduler(**SD15_SCHEDULER).config),
                  lora_path=lora, seed=seed,
                  unet_lora=lora_inputs_for(lora, manifest, w_face, batch=2),
                  unet_lora_single=lora_inputs_for(lora, manifest, w_face, batch=1),
                  te_lora=lora_inputs_for(lora, read_lora_manifest(graphs / contract.TEXT_ENCODER.name), w_face,
                                          batch=2))
    return base, setup


#: a random ``AutoencoderTiny`` of TAESD's shapes (diffusers' defaults: 64 channels, 1-3-3-3 encoder / 3-3-3-1
#: decoder blocks): ``write_random_tiny_vae(folder, **TAESD_SHAPES)``
TAESD_SHAPES = {"channels": 64, "num_encoder_blocks": (1, 3, 3, 3), "num_decoder_blocks": (3, 3, 3, 1)}


def export_tiny_decoder(base, graphs: Path, folder: Path) -> Path:
    """``graphs/vae_decoder_tiny/`` from a random ``AutoencoderTiny`` with :data:`TAESD_SHAPES`, the served tiny
    decoder's graph."""
    from facetron.export.onnx_export import export_model
    from facetron.export.onnx_graph import ModelDims
    from facetron.export.tiny_vae import load_tiny_vae, write_random_tiny_vae

    write_random_tiny_vae(folder, **TAESD_SHAPES)
    return export_model("vae_decoder_tiny", graphs, vae=load_tiny_vae(folder, base), dims=ModelDims.of(base))


def export_random_controlnet(base, graphs: Path, folder: Path) -> tuple[Path, Path]:
    """``graphs/controlnet/`` and ``graphs/unet/control/`` from a random ``ControlNetModel`` of the UNet's blocks
    (diffusers' default conditioning embedding 16-32-96-256, as SD-1.5's ControlNets)."""
    from facetron.export.controlnet import export_controlnet_graphs, load_controlnet, write_random_controlnet
    from facetron.export.diffusion_source import DiffusionSource
    from facetron.export.onnx_graph import ModelDims

    write_random_controlnet(folder, unet_config=dict(base.unet.config), conditioning_channels=(16, 32, 96, 256))
    net = load_controlnet(folder, base)
    try:
        return export_controlnet_graphs(net, base.unet, graphs, dims=ModelDims.of(base),
                                        rank=DiffusionSource.lora_rank)
    finally:
        del net
