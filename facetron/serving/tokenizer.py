"""The ``tokenizer`` model: prompt BYTES[N] -> input_ids INT32[N,77] (CLIP BPE)."""

from __future__ import annotations

from facetron.diffusion.clip_tokenizer import ClipTokenizer
from facetron.pipeline.net_io import check_prompts
from facetron.triton.backend import get_input, handle_each, pb


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
