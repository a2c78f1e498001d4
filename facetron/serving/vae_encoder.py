"""The ``vae_encoder`` model (template mode): RGB images UINT8 [N,H,W,3] -> scaled latent mean.

One ONNX net in the runtime its ``runtime`` parameter names, the requests of
a dynamic batch run as one call (:func:`facetron.triton.batching.net_model`)."""

from facetron import contract
from facetron.triton.batching import net_model

VaeEncoderModel = net_model(contract.VAE_ENCODER)
