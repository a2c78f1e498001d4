"""Triton python-backend model: input_ids INT32[N,77] -> last_hidden_state (ONNX Runtime)."""

import numpy as np

from facetron.serving.ort_net import single_net_model

TritonPythonModel = single_net_model("input_ids", np.int32, 2, "last_hidden_state")
