"""Triton python-backend model `controlnet`: see facetron.serving.controlnet."""

from facetron.serving.controlnet import ControlnetModel as TritonPythonModel  # noqa: F401
