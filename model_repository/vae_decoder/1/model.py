"""Triton python-backend model `vae_decoder`: see facetron.serving.ort_net."""

from facetron.serving.ort_net import VaeDecoderModel as TritonPythonModel  # noqa: F401
