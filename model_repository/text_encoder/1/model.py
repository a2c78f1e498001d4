"""Triton python-backend model `text_encoder`: see facetron.serving.text_encoder."""

from facetron.serving.text_encoder import TextEncoderModel as TritonPythonModel  # noqa: F401
