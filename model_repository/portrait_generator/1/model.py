"""Triton python-backend model `portrait_generator`: see facetron.serving.portrait_generator."""

from facetron.serving.portrait_generator import PortraitGeneratorModel as TritonPythonModel  # noqa: F401
