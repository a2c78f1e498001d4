"""facetron's in-process nets over the served graphs: one ONNX Runtime session per model, driven by
facetron's own sampler (``pipeline.generation.generate``). The parity tests hold these against diffusers'
pipelines; each test module picks its models (the UNet, the autoencoder, a ControlNet) from its sessions."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from facetron import contract
from facetron.diffusion.clip_tokenizer import ClipTokenizer
from facetron.diffusion.nets import DiffusionNets


def _repeat(item: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """One batch item's LoRA inputs for ``n`` items."""
    return {k: np.repeat(v, n, axis=0) for k, v in item.items()}


def onnx_nets(base, sessions: Mapping, *, te_lora: Mapping[str, np.ndarray], unet_lora: Mapping[str, np.ndarray],
              unet: str = contract.UNET.name, vae: str = contract.DEFAULT_VAE,
              control: tuple[str, str] | None = None) -> DiffusionNets:
    """:class:`DiffusionNets` over ``sessions`` (model name -> ``onnxruntime.InferenceSession``).

    ``te_lora`` / ``unet_lora``: one item's LoRA inputs of the text encoder / the UNet (zero = no LoRA),
    repeated per batch item; ``unet``: the session that denoises (``unet``, ``unet_fewstep``, an inpainting
    UNet); ``vae``: contract.VAE_CHOICES, its decoder and encoder sessions (an encoder not in ``sessions``:
    none); ``control``: (ControlNet session, the UNet's control-graph session) for template mode's ControlNet."""
    decoder, encoder = (sessions.get(c.name) for c in contract.VAE_MODELS[vae])

    def unet_fn(sample, t, hidden):
        return sessions[unet].run(["noise_pred"], {"sample": sample, "timestep": t, "encoder_hidden_states": hidden,
                                                   **_repeat(unet_lora, len(sample))})[0]

    def text_encode(ids):
        return sessions[contract.TEXT_ENCODER.name].run(None, {"input_ids": ids, **_repeat(te_lora, len(ids))})[0]

    extra = {}
    if control is not None:
        net, graph = sessions[control[0]], sessions[control[1]]
        residuals = [o.name for o in net.get_outputs()]

        def controlnet(sample, t, hidden, cond, scale):
            out = net.run(residuals, {"sample": sample, "timestep": t, "encoder_hidden_states": hidden,
                                      "controlnet_cond": cond, "conditioning_scale": scale})
            return dict(zip(residuals, out))

        def unet_control(sample, t, hidden, res):
            return graph.run(None, {"sample": sample, "timestep": t, "encoder_hidden_states": hidden, **res,
                                    **_repeat(unet_lora, len(sample))})[0]

        extra = {"controlnet": controlnet, "unet_control": unet_control}
    return DiffusionNets(tokenize=ClipTokenizer(), text_encode=text_encode, unet=unet_fn,
                         vae_decode=lambda lat: decoder.run(None, {"latent": lat})[0],
                         vae_encode=None if encoder is None else (lambda img: encoder.run(None, {"images": img})[0]),
                         latent_channels=int(base.vae.config.latent_channels), latent_factor=base.latent_factor,
                         **extra)
