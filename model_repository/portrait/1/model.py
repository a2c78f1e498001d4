"""Triton python-backend model `portrait`: see facetron.serving.portrait."""

from facetron.serving.portrait import PortraitModel as TritonPythonModel  # noqa: F401
