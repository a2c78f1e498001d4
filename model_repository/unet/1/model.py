"""Triton python-backend model `unet`: see facetron.serving.unet."""

from facetron.serving.unet import UnetModel as TritonPythonModel  # noqa: F401
