"""Triton python-backend model `face_embedder`: see facetron.serving.face_embedder."""

from facetron.serving.face_embedder import FaceEmbedderModel as TritonPythonModel  # noqa: F401
