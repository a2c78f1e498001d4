"""Triton python-backend model `vae_encoder`: see facetron.serving.ort_net."""

from facetron.serving.ort_net import VaeEncoderModel as TritonPythonModel  # noqa: F401
