"""Side-by-side timing: torch eager vs ONNX Runtime for one exported net.

``measure("unet", spec="tiny")`` builds the spec's nets from the fixed seed
(no files needed), exports the model to ONNX in a temp folder, then times
one call of each runtime alternately (A B A B …, warm-up excluded) on the
same inputs — batch 2 = one classifier-free-guidance step for the UNet.
Not a test: timings are reported, never asserted. The ``sd15`` spec exports
a 3.4 GB UNet (~1 min) and takes ~10 s per call on 2 CPU cores.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from facetron.export.onnx_export import export_model, graph_module
from facetron.export.onnx_graph import MODEL_FILE, ModelDims, example_inputs, model_io


def _nets(spec_name: str):
    from facetron.diffusion.base_model import build_models
    from facetron.diffusion.model_spec import SPECS

    spec = SPECS[spec_name]
    unet, vae, text_encoder = build_models(spec)
    base = SimpleNamespace(unet=unet, vae=vae, text_encoder=text_encoder, resolution=spec.resolution,
                           latent_factor=spec.latent_factor)
    return base, ModelDims.of(base)


def measure(model_name: str = "unet", spec: str = "tiny", repeats: int = 5, *, batch: int = 2,
            threads: int | None = None, work_dir: str | Path | None = None) -> dict:
    """Torch-eager ms vs ORT ms per call of ``model_name`` (``unet``, ``text_encoder``, ``vae_*``).

    ``threads``: intra-op threads for both runtimes (default: their defaults)."""
    import onnxruntime as ort

    from facetron.benchmarks.timing import interleaved, summarize

    base, dims = _nets(spec)
    module = graph_module(model_name, unet=base.unet, vae=base.vae, text_encoder=base.text_encoder)
    inputs, outputs = model_io(model_name, dims)
    feed = example_inputs(inputs, dims, batch=batch, seed=0)
    args = [torch.from_numpy(feed[s.name]) for s in inputs]
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="facetron-bench-") as tmp:
        t0 = time.perf_counter()
        export_model(model_name, tmp, dims=dims, **{"unet": base.unet, "vae": base.vae,
                                                            "text_encoder": base.text_encoder})
        export_s = time.perf_counter() - t0
        opts = ort.SessionOptions()
        # idle ORT threads must not spin: they would slow the torch call timed next
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            opts.intra_op_num_threads = threads
        t0 = time.perf_counter()
        sess = ort.InferenceSession(str(Path(tmp) / model_name / MODEL_FILE), opts, providers=["CPUExecutionProvider"])
        session_s = time.perf_counter() - t0
        old_threads = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            with torch.no_grad():
                ref = module(*args).numpy()
                got = sess.run(None, feed)[0]
                samples = interleaved({"torch": lambda: module(*args), "ort": lambda: sess.run(None, feed)},
                                      repeats=repeats, warmup=1)
        finally:
            torch.set_num_threads(old_threads)
    t_ms, o_ms = summarize(samples["torch"]), summarize(samples["ort"])
    return {
        "model": model_name, "spec": spec, "batch": batch, "latent": dims.latent_size, "repeats": repeats,
        "threads": threads or {"torch": torch.get_num_threads(), "ort": "default"},
        "torch_ms": t_ms["p50_ms"], "ort_ms": o_ms["p50_ms"], "torch": t_ms, "ort": o_ms,
        "ort_over_torch": round(o_ms["p50_ms"] / t_ms["p50_ms"], 3),
        "max_abs_diff": float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max()),
        "export_s": round(export_s, 2), "session_s": round(session_s, 2),
    }


if __name__ == "__main__":  # pragma: no cover
    import json
    import sys

    print(json.dumps(measure(*(sys.argv[1:2] or ["unet"]), spec=(sys.argv[2:3] or ["tiny"])[0]), indent=2))
