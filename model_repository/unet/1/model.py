"""Triton python-backend model: the runtime-LoRA UNet (ONNX Runtime).

Each batch item names its user (``user_id``; empty = base model) and style;
their LoRA tensors come from a bounded LRU bank (facetron.serving.lora_bank)
and are fed to the one runtime-LoRA graph, so users share batches and no
user needs a model reload."""

import json
from pathlib import Path

from facetron.diffusion.styles import STYLES
from facetron.serving.lora_bank import LoraBank
from facetron.serving.ort_net import open_session, run_batched, unet_feed, version_dir
from facetron.serving.triton_utils import model_parameters, pb
from facetron.users import UserRegistry, default_root


def _strings(request, name, n):
    t = pb().get_input_tensor_by_name(request, name)
    if t is None:
        return [""] * n
    arr = t.as_numpy().reshape(-1)
    if arr.shape[0] != n:
        raise ValueError(f"{name}: expected one value per batch item ({n}), got {arr.shape[0]}")
    return [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in arr]


def _style_lora(name):
    style = STYLES.get(name)
    return (style.lora, style.lora_weight) if style and style.lora else (None, 0.0)


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        folder = version_dir(args)
        threads = int(params.get("intra_op_threads") or 0) or None
        self.session = open_session(folder / "model.onnx", threads, params.get("providers") or "cpu")
        manifest = json.loads((folder / "lora_manifest.json").read_text())
        users = params.get("users_dir") or str(default_root())
        self.bank = LoraBank(
            manifest,
            UserRegistry(Path(users)),
            _style_lora,
            w_face=float(params.get("w_face") or 0.9),
            max_bytes=int(float(params.get("lora_cache_mb") or 512) * (1 << 20)),
        )

    def _read(self, request):
        feed = unet_feed(request)
        n = feed["sample"].shape[0]
        users, styles = _strings(request, "user_id", n), _strings(request, "style", n)
        feed.update(self.bank.batch(list(zip(users, styles))))
        return feed

    def _run(self, feed):
        return {"noise_pred": self.session.run(["noise_pred"], feed)[0]}

    def execute(self, requests):
        return run_batched(requests, self._read, self._run)
