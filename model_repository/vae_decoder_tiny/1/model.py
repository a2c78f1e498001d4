"""Triton python-backend model `vae_decoder_tiny`: see facetron.serving.vae_decoder_tiny."""

from facetron.serving.vae_decoder_tiny import VaeDecoderTinyModel as TritonPythonModel  # noqa: F401
