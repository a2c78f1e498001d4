"""Triton python-backend model: images UINT8[N,H,W,3] -> scaled latent mean (ONNX Runtime)."""

import numpy as np

from facetron.serving.ort_net import single_net_model

TritonPythonModel = single_net_model("images", np.uint8, 4, "latent")
