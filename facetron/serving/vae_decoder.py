"""The ``vae_decoder`` model: scaled latent [N,4,h,w] -> RGB images UINT8 [N,8h,8w,3].

One ONNX net in the runtime its ``runtime`` parameter names, the requests of
a dynamic batch run as one call (:func:`facetron.triton.batching.net_model`)."""

from facetron import contract
from facetron.triton.batching import net_model

VaeDecoderModel = net_model(contract.VAE_DECODER)
