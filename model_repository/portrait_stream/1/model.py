"""Triton python-backend model (decoupled): ``portrait`` with step progress.

Runs the generator's loop itself (its nets are BLS calls, so progress is
known per step) and streams ``progress = [done, total]`` after every
denoising step, then one final response with portrait's outputs."""

import json
import threading
from pathlib import Path

import numpy as np

from facetron.serving.generator import (
    PORTRAIT_INPUT_NAMES,
    bls_nets,
    build_job,
    portrait_values,
    request_arrays,
    run_job,
)
from facetron.serving.portrait_call import bls_detect, bls_select, run_portrait
from facetron.serving.triton_utils import error_response, model_parameters, pb
from facetron.users import UserRegistry, default_root

class TritonPythonModel:
    def initialize(self, args):
        self.params = model_parameters(args)
        self.repository = Path(args["model_repository"]).parent
        gen = self.repository / "portrait_generator" / "1"
        self.info = json.loads((gen / "model_info.json").read_text())
        self.scheduler_config = json.loads((gen / "scheduler_config.json").read_text())
        self.registry = UserRegistry(Path(self.params.get("users_dir") or default_root()))

    def _run(self, request):
        pb_utils = pb()
        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            arrays = request_arrays(request, PORTRAIT_INPUT_NAMES + ("top_k", "fuse"))

            def progress(done, total):
                sender.send(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("progress", np.array([done, total], np.int32))]))

            def generate(gen_inputs):
                job = build_job(
                    portrait_values(gen_inputs), self.info, self.registry,
                    max_images=int(self.params.get("max_images") or 16),
                    default_steps=int(self.params.get("default_steps") or 25),
                    default_guidance=float(self.params.get("default_guidance") or 7.0),
                )
                nets = bls_nets(self.info, job.user_id, job.style, self.params.get("identity_mode") or "runtime_lora",
                        self.repository)
                return run_job(job, nets, self.scheduler_config, bls_detect, progress=progress)

            out = run_portrait(arrays, self.registry, generate, bls_detect, bls_select, self.info)
            tensors = [pb_utils.Tensor(k, v) for k, v in out.items()]
            sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=final)
        except Exception as exc:  # noqa: BLE001 - every error must reach the client
            sender.send(error_response(exc), flags=final)

    def execute(self, requests):
        # each request runs on its own thread: a long generation must not block the next request's start
        for request in requests:
            threading.Thread(target=self._run, args=(request,), daemon=True).start()
        return None
