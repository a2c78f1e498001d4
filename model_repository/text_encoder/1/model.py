"""Triton python-backend model `text_encoder`: see facetron.serving.ort_net."""

from facetron.serving.ort_net import TextEncoderModel as TritonPythonModel  # noqa: F401
