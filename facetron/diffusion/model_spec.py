"""Base diffusion models: the tiny embedded default and SD-1.5 shapes.

One place for the configs. The tiny default uses the same classes as
Stable Diffusion 1.5 (UNet2DConditionModel, AutoencoderKL, CLIPTextModel,
CLIP tokenizer, DDPM-family scheduler) with very few channels, built from a
fixed seed, so the whole facetron chain runs on a laptop CPU in minutes.
**Its pictures are not portraits** (random weights + a few hundred LoRA
steps): every output made with it says so.

``sd15`` gives the full SD-1.5 shapes (860 M-parameter UNet) with random
weights, for export and latency stress tests only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from facetron.contract import TOKENS, VOCAB_SIZE

TINY_SEED = 20230828  # FaceChain's arXiv submission date; any fixed value works

SD15_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "clip_sample": False,
}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    resolution: int  # training/generation image side in pixels
    unet: dict[str, Any] = field(default_factory=dict)
    vae: dict[str, Any] = field(default_factory=dict)
    text_encoder: dict[str, Any] = field(default_factory=dict)
    is_smoke_model: bool = False

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.latent_factor


def _clip_text(hidden_size: int, intermediate_size: int, num_hidden_layers: int, num_attention_heads: int,
               **extra: Any) -> dict[str, Any]:
    """A CLIPTextModel config on CLIP's vocabulary and context (the vocabulary's last two ids are
    ``<|startoftext|>``, ``<|endoftext|>``; the latter also pads)."""
    return dict(vocab_size=VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=intermediate_size,
                num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                max_position_embeddings=TOKENS, projection_dim=hidden_size, **extra,
                bos_token_id=VOCAB_SIZE - 2, eos_token_id=VOCAB_SIZE - 1, pad_token_id=VOCAB_SIZE - 1)


def _vae(block_out_channels: tuple[int, ...], layers_per_block: int, sample_size: int, **extra: Any) -> dict[str, Any]:
    """An AutoencoderKL config in SD-1.5's layout: RGB in and out, 4 latent channels, one encoder and one
    decoder block per entry of ``block_out_channels``, SD-1.5's latent scaling."""
    n = len(block_out_channels)
    return dict(in_channels=3, out_channels=3, block_out_channels=block_out_channels,
                down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                layers_per_block=layers_per_block, latent_channels=4, **extra, sample_size=sample_size,
                scaling_factor=0.18215)


TINY = ModelSpec(
    name="facetron-tiny-sd",
    resolution=128,
    is_smoke_model=True,
    unet=dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    ),
    vae=_vae((32, 32, 64, 64), layers_per_block=1, sample_size=128, norm_num_groups=16),
    text_encoder=_clip_text(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
)

SD15 = ModelSpec(
    name="sd15-shapes-random",
    resolution=512,
    unet=dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
    ),
    vae=_vae((128, 256, 512, 512), layers_per_block=2, sample_size=512),
    text_encoder=_clip_text(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            hidden_act="quick_gelu"),
)

SPECS = {"tiny": TINY, "sd15": SD15}
