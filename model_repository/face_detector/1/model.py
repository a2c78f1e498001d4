"""Triton python-backend model `face_detector`: see facetron.serving.face_detector."""

from facetron.serving.face_detector import FaceDetectorModel as TritonPythonModel  # noqa: F401
