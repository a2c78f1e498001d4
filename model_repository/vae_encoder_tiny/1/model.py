"""Triton python-backend model `vae_encoder_tiny`: see facetron.serving.vae_encoder_tiny."""

from facetron.serving.vae_encoder_tiny import VaeEncoderTinyModel as TritonPythonModel  # noqa: F401
