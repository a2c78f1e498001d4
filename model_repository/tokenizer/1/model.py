"""Triton python-backend model `tokenizer`: see facetron.serving.tokenizer."""

from facetron.serving.tokenizer import TokenizerModel as TritonPythonModel  # noqa: F401
