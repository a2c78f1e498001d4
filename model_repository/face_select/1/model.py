"""Triton python-backend model `face_select`: see facetron.serving.face_select."""

from facetron.serving.face_select import FaceSelectModel as TritonPythonModel  # noqa: F401
