"""facetron: personalized portrait generation served by NVIDIA Triton."""

__version__ = "0.1.0"
