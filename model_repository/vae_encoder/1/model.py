"""Triton python-backend model `vae_encoder`: see facetron.serving.vae_encoder."""

from facetron.serving.vae_encoder import VaeEncoderModel as TritonPythonModel  # noqa: F401
