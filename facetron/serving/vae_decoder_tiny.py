"""The ``vae_decoder_tiny`` model (a request's ``vae=tiny``): scaled latent [N,4,h,w] -> RGB images
UINT8 [N,8h,8w,3], the ``vae_decoder``'s tensors, checks and budgets, with diffusers' AutoencoderTiny
(TAESD) as the graph.

The same model class as ``vae_decoder`` (:func:`facetron.triton.batching.net_model`) over its own contract."""

from facetron import contract
from facetron.triton.batching import net_model

VaeDecoderTinyModel = net_model(contract.VAE_DECODER_TINY)
