"""The tiny autoencoder a repository may serve beside the full VAE (``export repository --tiny-vae DIR``).

diffusers' ``AutoencoderTiny`` (TAESD) from a folder the user supplies (e.g. a
copy of ``madebyollin/taesd`` for SD 1.x): no weights ship with facetron.
:func:`load_tiny_vae` checks it against the base model before any export —
the same latent space (channels, pixels per latent cell), RGB in and out,
safetensors weights. Its latents are on the scale of the SD VAE's *scaled*
latents (``scaling_factor`` 1.0; diffusers' pipelines decode
``latents / vae.config.scaling_factor`` with either autoencoder), so the
served graphs take and give what ``vae_decoder`` / ``vae_encoder`` do.

:func:`write_random_tiny_vae`: a small random ``AutoencoderTiny`` in a
folder, for tests and the demo (its pictures are noise, like the tiny base
model's)."""

from __future__ import annotations

from pathlib import Path

from facetron.errors import InvalidInputError
from facetron.export.diffusers_folder import load_component, weights_hash

TINY_VAE_CLASS = "AutoencoderTiny"
FLAG = "--tiny-vae"


def tiny_vae_factors(config) -> tuple[int, int]:
    """(encoder, decoder) pixels per latent cell along a side of an ``AutoencoderTiny`` config: the encoder
    halves the side in every block but the first, the decoder upsamples by ``upsampling_scaling_factor``
    in every block but the last."""
    encoder = 2 ** (len(config.encoder_block_out_channels) - 1)
    decoder = int(config.upsampling_scaling_factor) ** (len(config.decoder_block_out_channels) - 1)
    return encoder, decoder


def load_tiny_vae(path: str | Path, base):
    """The ``AutoencoderTiny`` in folder ``path`` (diffusers layout, safetensors weights), checked against
    ``base`` (a :class:`facetron.diffusion.base_model.BaseModel`); InvalidInputError naming ``--tiny-vae``."""
    from diffusers import AutoencoderTiny

    vae = load_component(path, AutoencoderTiny, FLAG, "e.g. a copy of madebyollin/taesd for SD 1.x")
    # 3. the base model's latent space: channels, pixels per latent cell, RGB
    cfg, base_channels = vae.config, int(base.vae.config.latent_channels)
    if int(cfg.latent_channels) != base_channels:
        raise InvalidInputError(FLAG, f"{path}: its latents have {cfg.latent_channels} channels, the base model's VAE "
                                      f"{base_channels}: a tiny autoencoder for another model family (TAESD for SD 1.x "
                                      "and 2.x has 4 channels; TAESD3 / TAEF1 have 16)")
    factors = tiny_vae_factors(cfg)
    if factors != (base.latent_factor, base.latent_factor):
        raise InvalidInputError(FLAG, f"{path}: its encoder / decoder scale a latent cell to {factors[0]} / "
                                      f"{factors[1]} px, the base model's VAE to {base.latent_factor} px")
    if int(cfg.in_channels) != 3 or int(cfg.out_channels) != 3:
        raise InvalidInputError(FLAG, f"{path}: takes {cfg.in_channels} and gives {cfg.out_channels} image channels; "
                                      "the served VAEs are RGB (3)")
    return vae.eval()


def tiny_vae_info(path: str | Path, vae) -> dict:
    """What the generator records of the tiny autoencoder it serves (``model_info.json``'s ``tiny_vae``)."""
    path = Path(path)
    return {"class": TINY_VAE_CLASS, "path": str(path.resolve()), "hash": weights_hash(path),
            "latent_channels": int(vae.config.latent_channels), "scaling_factor": float(vae.config.scaling_factor)}


def write_random_tiny_vae(folder: str | Path, seed: int = 0, channels: int = 8, latent_channels: int = 4,
                          **config) -> Path:
    """A small ``AutoencoderTiny`` with seeded random weights saved (safetensors) to ``folder``: 4 blocks of
    ``channels`` channels (8 px per latent cell, as SD's VAE), one layer each; ``config``: other
    ``AutoencoderTiny`` arguments (``AutoencoderTiny()``'s defaults are TAESD's shapes). The convolutions are
    He-initialised, the decoder's last one scaled by 0.05 with bias 0.5: its pictures are mid-grey noise
    (~25 levels of spread, hardly clipped) and the encoder's latents spread about as SD's scaled ones, where
    diffusers' default init decodes to a third of the pixels clipped black."""
    import torch
    from diffusers import AutoencoderTiny

    shape = dict(encoder_block_out_channels=(channels,) * 4, decoder_block_out_channels=(channels,) * 4,
                 num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1))
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        vae = AutoencoderTiny(latent_channels=latent_channels, **{**shape, **config})
        for module in vae.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                if module.bias is not None:
                    module.bias.zero_()
        last = vae.decoder.layers[-1]
        last.weight.mul_(0.05)
        last.bias.fill_(0.5)
    vae.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)
