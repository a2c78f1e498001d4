"""Triton python-backend model `portrait_stream`: see facetron.serving.portrait_stream."""

from facetron.serving.portrait_stream import PortraitStreamModel as TritonPythonModel  # noqa: F401
