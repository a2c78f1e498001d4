"""Stable Diffusion 1.5 nets and sampler in plain torch — no diffusers, no transformers.

For ``benchmarks/gpu_script.py`` on a GPU machine that has torch but neither
diffusers (61 MB) nor transformers (129 MB). Each class mirrors one class of
those libraries: same ``state_dict()`` keys and shapes, same arithmetic, so
a checkpoint loads with ``strict=True`` and the outputs agree to float
rounding (``tests/test_gpu_script_nets.py`` checks both against diffusers
/ transformers on CPU, and the SD-1.5 key and shape maps on the meta
device).

* :class:`UNet2DConditionModel` — diffusers' ``UNet2DConditionModel`` for
  the SD-1.5 layout (cross-attention down/up blocks, plain down/up blocks,
  ``UNetMidBlock2DCrossAttn``), ``unet(sample, timestep, hidden) -> eps``;
* :class:`AutoencoderKL` — diffusers' ``AutoencoderKL``, decoding half only
  (``post_quant_conv`` + ``decoder``), ``vae.decode(latents) -> image``;
* :class:`CLIPTextModel` — transformers' ``CLIPTextModel`` with the
  checkpoint layout (``text_model.*`` keys), ``te(input_ids) -> last_hidden_state``;
* :class:`DPMSolverMultistepScheduler` — diffusers' scheduler of that name as
  facetron samples with: DPM-Solver++ 2M, epsilon prediction, first-order
  last step, optional Karras sigmas.

The config dicts (:data:`SD15`, :data:`TINY`, :data:`SCHEDULER`) are also
valid keyword arguments of the diffusers / transformers constructors
(``UNet2DConditionModel(**SD15["unet"])``, ``CLIPTextConfig(**SD15["text_encoder"])``,
``DPMSolverMultistepScheduler(**SCHEDULER)``), which is how the test builds
its oracles.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# This file stays self-contained (no facetron import): CLIP's numbers are copies, checked by
# tests/test_gpu_script_nets.py.
TOKENS = 77  # Copied from facetron.contract.TOKENS
VOCAB_SIZE = 49408  # Copied from facetron.contract.VOCAB_SIZE
BOS_ID, EOS_ID = VOCAB_SIZE - 2, VOCAB_SIZE - 1  # <|startoftext|>, <|endoftext|> (also the padding)

# Copied from facetron.diffusion.model_spec.SD15 (the configs of its nets; TINY likewise from model_spec.TINY)
SD15 = {
    "unet": dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                 layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
                 attention_head_dim=8),
    "vae": dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, latent_channels=4, sample_size=512, scaling_factor=0.18215),
    "text_encoder": dict(vocab_size=VOCAB_SIZE, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=TOKENS, projection_dim=768,
                         hidden_act="quick_gelu", bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID),
    "latent": 64,
}
TINY = {  # facetron's tiny smoke model (facetron/diffusion/model_spec.py): every block kind, few channels
    "unet": dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
                 norm_num_groups=32),
    "vae": dict(in_channels=3, out_channels=3, block_out_channels=(32, 32, 64, 64),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=1, latent_channels=4, norm_num_groups=16, sample_size=128, scaling_factor=0.18215),
    "text_encoder": dict(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=TOKENS, projection_dim=32, bos_token_id=BOS_ID,
                         eos_token_id=EOS_ID, pad_token_id=EOS_ID),
    "latent": 16,
}
#: SD-1.5's scheduler config with facetron's "dpmsolver" settings over it
#: (facetron.diffusion.model_spec.SD15_SCHEDULER + sampler.SCHEDULER_SETTINGS).
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 prediction_type="epsilon", steps_offset=1, algorithm_type="dpmsolver++", solver_order=2,
                 use_karras_sigmas=True)


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise NotImplementedError(f"sd15_nets: {what} is not implemented")


# ----------------------------------------------------------------------------- shared layers


def timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """diffusers ``get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)``: [N, dim] f32, cos first."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    """diffusers ``TimestepEmbedding``: linear_1, SiLU, linear_2."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(in_dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """diffusers ``ResnetBlock2D`` (time_embedding_norm "default", output scale 1); no ``time_emb_proj``
    when ``temb_channels`` is None (the VAE's), 1×1 ``conv_shortcut`` where the channels change."""

    def __init__(self, cin: int, cout: int, temb_channels: int | None, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, cout) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Downsample2D(nn.Module):
    """diffusers ``Downsample2D(use_conv=True, padding=1)``: 3×3 conv, stride 2."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample2D(nn.Module):
    """diffusers ``Upsample2D(use_conv=True)``: nearest ×2, then 3×3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Attention(nn.Module):
    """diffusers ``Attention`` with ``AttnProcessor2_0`` (scaled_dot_product_attention).

    UNet use: token input [B, L, C], q/k/v without bias, ``context`` for
    cross-attention. VAE use (``group_norm`` given): image input [B, C, H, W],
    GroupNorm first, biased q/k/v, residual added."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None, bias: bool = False,
                 group_norm: tuple[int, float] | None = None):
        super().__init__()
        inner, context_dim = heads * head_dim, context_dim or dim
        self.heads = heads
        self.group_norm = nn.GroupNorm(group_norm[0], dim, eps=group_norm[1]) if group_norm else None
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])  # diffusers' to_out.1 is a Dropout

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        residual, image = x, x.ndim == 4
        if image:
            b, c, hgt, wid = x.shape
            x = x.view(b, c, hgt * wid).transpose(1, 2)
        if self.group_norm is not None:
            x = self.group_norm(x.transpose(1, 2)).transpose(1, 2)
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        split = lambda t: t.view(t.shape[0], -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        out = self.to_out[0](out.transpose(1, 2).reshape(q.shape))
        if image:
            out = out.transpose(1, 2).reshape(b, c, hgt, wid)
        return out + residual if self.group_norm is not None else out


class GEGLU(nn.Module):
    """diffusers ``GEGLU``: one projection to 2×inner, value × gelu(gate)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """diffusers ``FeedForward(activation_fn="geglu")``: keys ``net.0.proj``, ``net.2``."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """diffusers ``BasicTransformerBlock`` (layer_norm): self-attention, cross-attention, GEGLU feed-forward,
    each pre-normed and residual."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), Attention(dim, heads, dim // heads)
        self.norm2, self.attn2 = nn.LayerNorm(dim), Attention(dim, heads, dim // heads, context_dim)
        self.norm3, self.ff = nn.LayerNorm(dim), FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nn.Module):
    """diffusers ``Transformer2DModel`` as SD-1.5 has it: GroupNorm (eps 1e-6), 1×1 conv ``proj_in``,
    one :class:`BasicTransformerBlock`, 1×1 conv ``proj_out``, residual."""

    def __init__(self, ch: int, heads: int, context_dim: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(ch, heads, context_dim)])
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        h = self.proj_in(self.norm(x)).permute(0, 2, 3, 1).reshape(b, hgt * wid, c)
        for block in self.transformer_blocks:
            h = block(h, context)
        return self.proj_out(h.reshape(b, hgt, wid, c).permute(0, 3, 1, 2).contiguous()) + x


# ----------------------------------------------------------------------------- UNet


class _UNetBlock(nn.Module):
    """Resnets, each followed by a :class:`Transformer2DModel` when ``heads`` is set (the CrossAttn* kinds)."""

    def _stack(self, ins: list[int], cout: int, temb: int, groups: int, eps: float, heads: int | None,
               context_dim: int) -> None:
        if heads:
            self.attentions = nn.ModuleList([Transformer2DModel(cout, heads, context_dim, groups) for _ in ins])
        else:
            self.attentions = [None] * len(ins)  # a plain list: no parameters, no state_dict keys
        self.resnets = nn.ModuleList([ResnetBlock2D(cin, cout, temb, groups, eps) for cin in ins])

    def _layer(self, i: int, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.resnets[i](x, temb)
        return x if self.attentions[i] is None else self.attentions[i](x, context)


class DownBlock2D(_UNetBlock):
    """diffusers ``DownBlock2D`` (``heads`` None) and ``CrossAttnDownBlock2D`` (``heads`` set):
    ``layers`` resnets [+ transformers], then a :class:`Downsample2D` unless last.
    Returns the output and every intermediate state (the skip connections)."""

    def __init__(self, cin: int, cout: int, layers: int, temb: int, groups: int, eps: float, downsample: bool,
                 heads: int | None = None, context_dim: int = 0):
        super().__init__()
        self._stack([cin] + [cout] * (layers - 1), cout, temb, groups, eps, heads, context_dim)
        self.downsamplers = nn.ModuleList([Downsample2D(cout)]) if downsample else None

    def forward(self, x, temb, context):
        states = []
        for i in range(len(self.resnets)):
            x = self._layer(i, x, temb, context)
            states.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            states.append(x)
        return x, states


class UpBlock2D(_UNetBlock):
    """diffusers ``UpBlock2D`` / ``CrossAttnUpBlock2D``: ``layers`` resnets, each fed the running state
    concatenated with one skip state (last first) [+ transformers], then an :class:`Upsample2D` unless last."""

    def __init__(self, cin: int, prev: int, cout: int, layers: int, temb: int, groups: int, eps: float,
                 upsample: bool, heads: int | None = None, context_dim: int = 0):
        super().__init__()
        ins = [(prev if j == 0 else cout) + (cin if j == layers - 1 else cout) for j in range(layers)]
        self._stack(ins, cout, temb, groups, eps, heads, context_dim)
        self.upsamplers = nn.ModuleList([Upsample2D(cout)]) if upsample else None

    def forward(self, x, skips, temb, context):
        for i in range(len(self.resnets)):
            x = self._layer(i, torch.cat([x, skips.pop()], dim=1), temb, context)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class MidBlock2D(nn.Module):
    """diffusers ``UNetMidBlock2DCrossAttn`` (UNet) and ``UNetMidBlock2D`` (VAE): resnet, then
    (attention, resnet) once. ``attention`` is the built attention module."""

    def __init__(self, ch: int, temb: int | None, groups: int, eps: float, attention: nn.Module):
        super().__init__()
        self.attentions = nn.ModuleList([attention])
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, temb, groups, eps) for _ in range(2)])

    def forward(self, x, temb=None, context=None):
        x = self.resnets[0](x, temb)
        attn = self.attentions[0]
        x = attn(x, context) if isinstance(attn, Transformer2DModel) else attn(x)
        return self.resnets[1](x, temb)


class UNet2DConditionModel(nn.Module):
    """diffusers ``UNet2DConditionModel`` for SD-1.5-style configs (same keyword arguments; anything
    else than that layout raises). ``forward(sample, timestep, encoder_hidden_states) -> noise_pred``;
    ``timestep`` a number, a 0-d or an [N] tensor. Spatial sides must be multiples of
    ``2 ** (len(block_out_channels) - 1)``."""

    def __init__(self, sample_size: int | None = None, in_channels: int = 4, out_channels: int = 4,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 block_out_channels=(320, 640, 1280, 1280), layers_per_block: int = 2, norm_num_groups: int = 32,
                 norm_eps: float = 1e-5, cross_attention_dim: int = 1280, attention_head_dim: int = 8,
                 num_attention_heads: int | None = None):
        super().__init__()
        chans, n = list(block_out_channels), len(block_out_channels)
        _require(len(down_block_types) == n == len(up_block_types), "unequal block lists")
        _require(set(down_block_types) <= {"CrossAttnDownBlock2D", "DownBlock2D"}, f"down blocks {down_block_types}")
        _require(set(up_block_types) <= {"CrossAttnUpBlock2D", "UpBlock2D"}, f"up blocks {up_block_types}")
        heads = num_attention_heads or attention_head_dim  # diffusers' naming quirk: SD-1.5's "8" is the head count
        temb, groups, ctx = chans[0] * 4, norm_num_groups, cross_attention_dim
        self.sample_size = sample_size
        self.conv_in = nn.Conv2d(in_channels, chans[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chans[0], temb)
        self.down_blocks = nn.ModuleList([
            DownBlock2D(chans[max(i - 1, 0)], chans[i], layers_per_block, temb, groups, norm_eps, i < n - 1,
                        heads if kind.startswith("CrossAttn") else None, ctx)
            for i, kind in enumerate(down_block_types)])
        rev = chans[::-1]
        self.up_blocks = nn.ModuleList([
            UpBlock2D(rev[min(i + 1, n - 1)], rev[max(i - 1, 0)], rev[i], layers_per_block + 1, temb, groups,
                      norm_eps, i < n - 1, heads if kind.startswith("CrossAttn") else None, ctx)
            for i, kind in enumerate(up_block_types)])
        self.mid_block = MidBlock2D(chans[-1], temb, groups, norm_eps, Transformer2DModel(chans[-1], heads, ctx, groups))
        self.conv_norm_out = nn.GroupNorm(groups, chans[0], eps=norm_eps)
        self.conv_out = nn.Conv2d(chans[0], out_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        t = timestep if torch.is_tensor(timestep) else torch.tensor(float(timestep))
        t = t.reshape(-1).to(sample.device).expand(sample.shape[0])
        temb = self.time_embedding(timestep_embedding(t, self.conv_in.out_channels).to(sample.dtype))
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, states = block(x, temb, encoder_hidden_states)
            skips += states
        x = self.mid_block(x, temb, encoder_hidden_states)
        for block in self.up_blocks:
            x = block(x, skips, temb, encoder_hidden_states)  # pops its skips off the end
        return self.conv_out(F.silu(self.conv_norm_out(x)))


# ----------------------------------------------------------------------------- VAE


class UpDecoderBlock2D(nn.Module):
    """diffusers ``UpDecoderBlock2D``: resnets without time embedding, then an :class:`Upsample2D` unless last."""

    def __init__(self, cin: int, cout: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(cin if j == 0 else cout, cout, None, groups, 1e-6)
                                      for j in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(cout)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Decoder(nn.Module):
    """diffusers ``autoencoders.vae.Decoder`` (group norm, SiLU, mid-block attention)."""

    def __init__(self, latent_channels: int, out_channels: int, block_out_channels, layers_per_block: int,
                 groups: int):
        super().__init__()
        rev = list(block_out_channels)[::-1]
        self.conv_in = nn.Conv2d(latent_channels, rev[0], 3, padding=1)
        self.up_blocks = nn.ModuleList([
            UpDecoderBlock2D(rev[max(i - 1, 0)], rev[i], layers_per_block + 1, groups, i < len(rev) - 1)
            for i in range(len(rev))])
        self.mid_block = MidBlock2D(rev[0], None, groups, 1e-6,
                                    Attention(rev[0], 1, rev[0], bias=True, group_norm=(groups, 1e-6)))
        self.conv_norm_out = nn.GroupNorm(groups, rev[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(rev[-1], out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """The decoding half of diffusers ``AutoencoderKL`` (same keyword arguments; the encoder ones are
    accepted and unused): ``post_quant_conv`` + ``decoder``, whose keys equal the ``post_quant_conv.*``
    and ``decoder.*`` keys of diffusers' state_dict. ``decode(latents) -> image`` in [-1, 1];
    divide SD latents by ``scaling_factor`` first, as pipelines do."""

    def __init__(self, in_channels: int = 3, out_channels: int = 3, down_block_types=("DownEncoderBlock2D",),
                 up_block_types=("UpDecoderBlock2D",), block_out_channels=(64,), layers_per_block: int = 1,
                 act_fn: str = "silu", latent_channels: int = 4, norm_num_groups: int = 32, sample_size: int = 32,
                 scaling_factor: float = 0.18215):
        super().__init__()
        _require(act_fn == "silu" and set(up_block_types) == {"UpDecoderBlock2D"}
                 and len(up_block_types) == len(block_out_channels), f"VAE decoder {up_block_types}, {act_fn}")
        self.scaling_factor = scaling_factor
        self.decoder = Decoder(latent_channels, out_channels, block_out_channels, layers_per_block, norm_num_groups)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(latents))

    forward = decode


# ----------------------------------------------------------------------------- CLIP text encoder


class CLIPAttention(nn.Module):
    """transformers ``CLIPAttention`` (causal here): q/k/v/out projections with bias, SDPA."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.k_proj, self.v_proj, self.q_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        split = lambda t: t.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                             is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class CLIPMLP(nn.Module):
    """transformers ``CLIPMLP``: fc1, activation (quick_gelu or gelu), fc2."""

    def __init__(self, dim: int, inner: int, act: str):
        super().__init__()
        _require(act in ("quick_gelu", "gelu"), f"CLIP hidden_act {act!r}")
        self.fc1, self.fc2, self.act = nn.Linear(dim, inner), nn.Linear(inner, dim), act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        x = x * torch.sigmoid(1.702 * x) if self.act == "quick_gelu" else F.gelu(x)
        return self.fc2(x)


class CLIPEncoderLayer(nn.Module):
    """transformers ``CLIPEncoderLayer``: pre-norm attention and MLP, each residual."""

    def __init__(self, dim: int, heads: int, inner: int, act: str, eps: float):
        super().__init__()
        self.self_attn, self.layer_norm1 = CLIPAttention(dim, heads), nn.LayerNorm(dim, eps=eps)
        self.mlp, self.layer_norm2 = CLIPMLP(dim, inner, act), nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextEmbeddings(nn.Module):
    """transformers ``CLIPTextEmbeddings``: token + learned position embeddings (position_ids not persistent)."""

    def __init__(self, vocab: int, dim: int, positions: int):
        super().__init__()
        self.token_embedding, self.position_embedding = nn.Embedding(vocab, dim), nn.Embedding(positions, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[-1], device=ids.device)[None]
        return self.token_embedding(ids) + self.position_embedding(pos)


class CLIPTextTransformer(nn.Module):
    """transformers ``CLIPTextTransformer``: embeddings, ``encoder.layers``, ``final_layer_norm``."""

    def __init__(self, vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
                 max_position_embeddings, hidden_act, layer_norm_eps):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(vocab_size, hidden_size, max_position_embeddings)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList([
            CLIPEncoderLayer(hidden_size, num_attention_heads, intermediate_size, hidden_act, layer_norm_eps)
            for _ in range(num_hidden_layers)])
        self.final_layer_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(ids)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.final_layer_norm(x)


class CLIPTextModel(nn.Module):
    """transformers ``CLIPTextModel`` in the checkpoint layout (``text_model.*`` keys, as SD-1.5's
    ``text_encoder`` files and transformers 4.x name them; transformers 5 drops the prefix in memory).
    Keyword arguments are those of ``CLIPTextConfig`` (projection_dim and token ids accepted, unused).
    ``te(input_ids) -> last_hidden_state``."""

    def __init__(self, vocab_size: int = VOCAB_SIZE, hidden_size: int = 512, intermediate_size: int = 2048,
                 projection_dim: int = 512, num_hidden_layers: int = 12, num_attention_heads: int = 8,
                 max_position_embeddings: int = TOKENS, hidden_act: str = "quick_gelu", layer_norm_eps: float = 1e-5,
                 pad_token_id: int = 1, bos_token_id: int = BOS_ID, eos_token_id: int = EOS_ID):
        super().__init__()
        self.text_model = CLIPTextTransformer(vocab_size, hidden_size, intermediate_size, num_hidden_layers,
                                              num_attention_heads, max_position_embeddings, hidden_act, layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_model(input_ids)


# ----------------------------------------------------------------------------- scheduler


class DPMSolverMultistepScheduler:
    """diffusers ``DPMSolverMultistepScheduler`` for DPM-Solver++ 2M (``algorithm_type="dpmsolver++"``,
    ``solver_order=2``, ``solver_type="midpoint"``, epsilon prediction, ``final_sigmas_type="zero"`` so
    the last step is first order, ``timestep_spacing="linspace"``), with or without Karras sigmas.
    Keyword arguments as diffusers'; other values raise. ``step`` must be called once per timestep of
    ``timesteps``, in order (as pipelines do); its coefficients are computed in ``set_timesteps`` in
    float32 as diffusers computes them, so a step does no host sync."""

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", solver_order: int = 2, prediction_type: str = "epsilon",
                 algorithm_type: str = "dpmsolver++", solver_type: str = "midpoint", lower_order_final: bool = True,
                 use_karras_sigmas: bool = False, final_sigmas_type: str = "zero",
                 timestep_spacing: str = "linspace", steps_offset: int = 0):
        for name, value, ok in (("solver_order", solver_order, (1, 2)), ("prediction_type", prediction_type, ("epsilon",)),
                                ("algorithm_type", algorithm_type, ("dpmsolver++",)),
                                ("solver_type", solver_type, ("midpoint",)), ("final_sigmas_type", final_sigmas_type, ("zero",)),
                                ("timestep_spacing", timestep_spacing, ("linspace",)),
                                ("beta_schedule", beta_schedule, ("linear", "scaled_linear"))):
            _require(value in ok, f"DPMSolverMultistepScheduler {name}={value!r}")
        self.num_train_timesteps, self.solver_order, self.use_karras_sigmas = num_train_timesteps, solver_order, use_karras_sigmas
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        else:
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.init_noise_sigma = 1.0
        self.timesteps, self.sigmas, self.num_inference_steps = None, None, None

    def _karras(self, train_sigmas: torch.Tensor, n: int) -> tuple[list[float], list[int]]:
        """diffusers ``_convert_to_karras`` (rho 7) then ``_sigma_to_t`` (log-sigma interpolation), rounded."""
        lo, hi, rho = train_sigmas[0].item(), train_sigmas[-1].item(), 7.0
        ramp = [1.0 if 0 < i == n - 1 else i * (1.0 / max(n - 1, 1)) for i in range(n)]  # numpy's linspace(0, 1, n)
        sigmas = [(hi ** (1 / rho) + r * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho for r in ramp]
        log_sigmas = torch.log(train_sigmas)  # float32, as numpy's log of the float32 array
        last = len(log_sigmas) - 2
        steps = []
        for s in sigmas:
            ls = math.log(max(s, 1e-10))
            low = min(max(int((log_sigmas.double() <= ls).sum()) - 1, 0), last)
            lv, gap = log_sigmas[low].item(), (log_sigmas[low] - log_sigmas[low + 1]).item()
            w = min(max((lv - ls) / gap, 0.0), 1.0)
            steps.append(round((1 - w) * low + w * (low + 1)))
        return sigmas, steps

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        n = num_inference_steps
        train_sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        if self.use_karras_sigmas:
            sigmas, steps = self._karras(train_sigmas, n)
        else:  # numpy's linspace(0, T - 1, n + 1).round()[::-1][:-1]: k * step, last point exact, half to even
            step = (self.num_train_timesteps - 1) / n
            steps = [self.num_train_timesteps - 1 if k == n else round(k * step) for k in range(n, 0, -1)]
            sigmas = [train_sigmas[t].item() for t in steps]
        self.num_inference_steps = n
        self.timesteps = torch.tensor(steps, dtype=torch.int64, device=device)
        sig = torch.tensor(sigmas + [0.0], dtype=torch.float32)
        self.sigmas = sig
        # per step i (sigma_i -> sigma_{i+1}), float32 like diffusers' 0-d tensors, kept as Python floats
        alpha = 1 / ((sig**2 + 1) ** 0.5)
        sigma = sig * alpha
        lam = torch.log(alpha) - torch.log(sigma)
        h = lam[1:] - lam[:-1]
        a = alpha[1:] * (torch.exp(-h) - 1.0)
        r0 = torch.cat([torch.ones(1), (lam[1:-1] - lam[:-2]) / h[1:]])  # h_0 / h; unused at step 0
        self._coef = list(zip(sigma[:-1].tolist(), alpha[:-1].tolist(), (sigma[1:] / sigma[:-1]).tolist(),
                              a.tolist(), (0.5 * a).tolist(), (1.0 / r0).tolist()))
        self._index, self._prev = 0, None

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> torch.Tensor:
        """One solver step from ``timesteps[i]`` to the next: ``prev_sample`` (model_output's dtype)."""
        i = self._index
        sigma_s, alpha_s, ratio, a, half_a, inv_r0 = self._coef[i]
        x0 = (sample - sigma_s * model_output) / alpha_s  # data prediction from epsilon
        first_order = self.solver_order == 1 or self._prev is None or i == len(self._coef) - 1
        prev = ratio * sample.to(torch.float32) - a * x0
        if not first_order:
            prev = prev - half_a * (inv_r0 * (x0 - self._prev))
        self._index, self._prev = i + 1, x0
        return prev.to(model_output.dtype)
