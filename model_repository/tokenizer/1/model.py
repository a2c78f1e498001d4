"""Triton python-backend model: prompt BYTES[N] -> input_ids INT32[N,77]."""

import numpy as np
import triton_python_backend_utils as pb_utils

from facetron.diffusion.clip_tokenizer import ClipTokenizer

MAX_PROMPTS = 256
MAX_PROMPT_BYTES = 16384


def _error(message: str) -> "pb_utils.InferenceResponse":
    return pb_utils.InferenceResponse(
        output_tensors=[], error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
    )


class TritonPythonModel:
    def initialize(self, args):
        self.tokenizer = ClipTokenizer()

    def _tokenize(self, request):
        tensor = pb_utils.get_input_tensor_by_name(request, "prompt")
        raw = tensor.as_numpy()
        if raw.ndim != 1:
            return _error(f"prompt: expected shape [N], got {list(raw.shape)}")
        if raw.shape[0] == 0:
            return _error("prompt: expected at least one prompt, got N=0")
        if raw.shape[0] > MAX_PROMPTS:
            return _error(f"prompt: at most {MAX_PROMPTS} prompts per request, got {raw.shape[0]}")
        texts = []
        for i, item in enumerate(raw):
            data = item if isinstance(item, bytes) else str(item).encode()
            if len(data) > MAX_PROMPT_BYTES:
                return _error(f"prompt[{i}]: longer than {MAX_PROMPT_BYTES} bytes")
            try:
                texts.append(data.decode("utf-8"))
            except UnicodeDecodeError as exc:
                return _error(f"prompt[{i}]: not valid UTF-8 ({exc.reason} at byte {exc.start})")
        ids = self.tokenizer(texts)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("input_ids", ids)])

    def execute(self, requests):
        return [self._tokenize(r) for r in requests]
