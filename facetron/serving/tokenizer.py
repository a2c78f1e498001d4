"""The ``tokenizer`` model: prompt BYTES[N] -> input_ids INT32[N,77] (CLIP BPE)."""

from __future__ import annotations

import numpy as np

from facetron import contract
from facetron.diffusion.clip_tokenizer import ClipTokenizer
from facetron.errors import InvalidInputError
from facetron.serving.backend import decode_utf8, get_input, handle_each, pb


def check_prompts(raw: np.ndarray, name: str = "prompt") -> list[str]:
    """The prompts of a request as text, each rule naming the input."""
    if raw.ndim != 1:
        raise InvalidInputError(name, f"expected shape [N], got {list(raw.shape)}")
    if raw.shape[0] == 0:
        raise InvalidInputError(name, "expected at least one prompt, got N=0")
    if raw.shape[0] > contract.MAX_PROMPTS:
        raise InvalidInputError(name, f"at most {contract.MAX_PROMPTS} prompts per request, got {raw.shape[0]}")
    texts = []
    for i, item in enumerate(raw):
        data = item if isinstance(item, bytes) else str(item).encode()
        if len(data) > contract.MAX_PROMPT_BYTES:
            raise InvalidInputError(f"{name}[{i}]", f"longer than {contract.MAX_PROMPT_BYTES} bytes")
        texts.append(decode_utf8(data, f"{name}[{i}]"))
    return texts


class TokenizerModel:
    def initialize(self, args):
        self.tokenizer = ClipTokenizer()
        self.logger = pb().Logger

    def _tokenize(self, request):
        texts = check_prompts(get_input(request, "prompt"))
        return {"input_ids": self.tokenizer(texts)}

    def execute(self, requests):
        return handle_each(requests, self._tokenize, self.logger)

    def finalize(self):
        self.tokenizer = None
