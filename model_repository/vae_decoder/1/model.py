"""Triton python-backend model: latent FP32[N,4,h,w] -> images UINT8[N,8h,8w,3] (ONNX Runtime)."""

import numpy as np

from facetron.serving.ort_net import single_net_model

TritonPythonModel = single_net_model("latent", np.float32, 4, "images")
