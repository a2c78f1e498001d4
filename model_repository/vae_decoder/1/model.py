"""Triton python-backend model `vae_decoder`: see facetron.serving.vae_decoder."""

from facetron.serving.vae_decoder import VaeDecoderModel as TritonPythonModel  # noqa: F401
