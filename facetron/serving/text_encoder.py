"""The ``text_encoder`` model: the runtime-LoRA CLIP text encoder and its LoRA bank.

Each batch item names its user (``user_id``; absent or empty = base model).
The bank (:class:`facetron.pipeline.lora_bank.LoraBank`, the UNet's class over this
graph's manifest) turns a user into the text-encoder layers of the user's
face LoRA at ``w_face`` — all zeros, i.e. exactly the base text encoder, for
a user whose LoRA has none — keyed by the user's registry version, so a
retrained user is read again. Style LoRAs adapt the UNet only
(:mod:`facetron.style_registry` refuses text-encoder layers), so there is no style
here. The graph (``export/runtime_lora.py``,
``export_runtime_lora_text_encoder``) computes ``y = W x + s · B (A x)`` on
every self-attention projection; no torch is imported at serve time."""

from __future__ import annotations

import numpy as np

from facetron import metrics
from facetron.contract import TextEncoderParams
from facetron.diffusion.lora_inputs import read_lora_manifest
from facetron.net_runtimes import open_runtime
from facetron.pipeline.lora_bank import LoraBank
from facetron.pipeline.net_io import check_feed, check_token_ids
from facetron.triton.backend import check_callers, get_input, read_params, version_dir
from facetron.triton.batching import item_strings, run_batched
from facetron.users import served_registry


class TextEncoderModel:
    def initialize(self, args):
        params = read_params(args, TextEncoderParams)
        folder = version_dir(args)
        # ONNX Runtime or OpenVINO (params.runtime): the LoRA tensors are plain graph inputs in both
        self.session = open_runtime(folder / "model.onnx", params.runtime, params.intra_op_threads or None,
                                    params.providers, precision=params.precision)
        self.registry = served_registry(params.users_dir)
        self.bank = LoraBank(read_lora_manifest(folder), self.registry, w_face=params.w_face,
                             max_bytes=int(params.lora_cache_mb * (1 << 20)))
        metrics.install(args["model_name"])

    def _read(self, request):
        ids = check_token_ids(get_input(request, "input_ids", dtype=np.int32, ndim=2))
        feed = check_feed({"input_ids": ids}, self.session)
        n = ids.shape[0]
        users = item_strings(request, "user_id", n)
        check_callers(request, self.registry, users)  # each named user is the caller's own (its token)
        items = [(u, "", v) for u, v in zip(users, item_strings(request, "user_version", n))]
        feed.update(self.bank.batch(self.bank.keys(items)))
        return feed

    def _run(self, feed):
        return {"last_hidden_state": self.session.run(["last_hidden_state"], feed)[0]}

    def execute(self, requests):
        return run_batched(requests, self._read, self._run)

    def finalize(self):
        self.session = self.bank = None
        metrics.uninstall()
