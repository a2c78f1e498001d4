"""The ``controlnet`` model (template mode with a control; ``export repository --controlnet DIR``).

The UNet's inputs (``sample``, ``timestep``, ``encoder_hidden_states``: the
unet's checks and budget) + the conditioning image ``controlnet_cond`` [N, 3,
f*h, f*w] in [0, 1] and ``conditioning_scale`` [N, 1] -> the residuals the
runtime-LoRA ``unet`` adds (its version folder's layout names them:
:func:`facetron.pipeline.net_io.read_control_layout`). A dynamic batch runs
as one call (within the unet's cell budget). No torch is imported here."""

from __future__ import annotations

import numpy as np

from facetron.contract import MODEL_FILE, NetParams
from facetron.net_runtimes import UNET_ORT_MEMORY, open_runtime
from facetron.pipeline.net_io import (NET_BUDGETS, check_control_inputs, check_feed, check_sample_sides,
                                      read_control_layout, read_down_factor)
from facetron.triton.backend import get_input, read_params, version_dir
from facetron.triton.batching import run_batched, unet_feed


class ControlnetModel:
    def initialize(self, args):
        params = read_params(args, NetParams)
        folder = version_dir(args)
        # per-call work bounded by the unet's cell budget: the unet's arena rule (keep it), not a shrink per call
        self.session = open_runtime(folder / MODEL_FILE, params.runtime, params.intra_op_threads or None,
                                    params.providers, precision=params.precision, memory=UNET_ORT_MEMORY)
        layout = read_control_layout(folder)
        self.outputs = [r["name"] for r in layout["residuals"]]
        self.cond_factor = int(layout["cond_factor"])
        self.down_factor = read_down_factor(folder)  # its residuals go to the unet: that UNet's sides (io.json)

    def _read(self, request):
        feed = unet_feed(request)  # sample within the unet's budget, timestep per item, finite
        check_sample_sides(feed["sample"], self.down_factor)
        cond = get_input(request, "controlnet_cond", dtype=np.float32, ndim=4)
        scale = get_input(request, "conditioning_scale", required=False)
        feed["controlnet_cond"], feed["conditioning_scale"] = check_control_inputs(cond, scale, feed["sample"],
                                                                                   self.cond_factor)
        return check_feed(feed, self.session)

    def _run(self, feed):
        return dict(zip(self.outputs, self.session.run(self.outputs, feed)))

    def execute(self, requests):
        return run_batched(requests, self._read, self._run, NET_BUDGETS["controlnet"])

    def finalize(self):
        self.session = None
