"""The ``vae_encoder_tiny`` model (template mode with ``vae=tiny``): RGB images UINT8 [N,H,W,3] -> scaled
latent (AutoencoderTiny's encoder is deterministic), the ``vae_encoder``'s tensors, checks and budgets.

The same model class as ``vae_encoder`` (:func:`facetron.triton.batching.net_model`) over its own contract."""

from facetron import contract
from facetron.triton.batching import net_model

VaeEncoderTinyModel = net_model(contract.VAE_ENCODER_TINY)
