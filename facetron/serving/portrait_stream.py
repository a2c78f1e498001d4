"""The ``portrait_stream`` model (decoupled): ``portrait`` with step progress.

Runs portrait's path (:func:`facetron.serving.portrait.run_portrait`) and
streams ``progress = [done, total]`` after every denoising step, then one
final response with portrait's outputs. Lifecycle as in Triton's decoupled
example: the transaction policy is checked in ``initialize``, in-flight
requests are counted under a lock, and ``finalize`` waits for them."""

from __future__ import annotations

import threading
import time

import numpy as np

from facetron import contract
from facetron.errors import FacetronError
from facetron.serving.backend import error_response, is_decoupled, pb, request_arrays, response
from facetron.serving.portrait import run_portrait
from facetron.serving.portrait_generator import ServedGenerator

FINALIZE_WAIT_S = 30.0


class PortraitStreamModel:
    def initialize(self, args):
        if not is_decoupled(args):
            raise FacetronError(f"{args['model_name']}: needs a decoupled model transaction policy "
                                "(model_transaction_policy {{ decoupled: true }})")
        self.generator = ServedGenerator.from_args(args)
        self.logger = pb().Logger
        self.inflight = 0
        self.lock = threading.Lock()

    def _run(self, request):
        p = pb()
        sender = request.get_response_sender()
        final = p.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            def progress(done: int, total: int) -> None:
                sender.send(response({"progress": np.array([done, total], np.int32)}))

            out = run_portrait(request_arrays(request, contract.PORTRAIT_INPUT_NAMES), self.generator, progress)
            sender.send(response(out), flags=final)
        except Exception as exc:  # noqa: BLE001 - every error must reach the client
            sender.send(error_response(exc), flags=final)
        finally:
            with self.lock:
                self.inflight -= 1

    def execute(self, requests):
        # each request runs on its own thread: a long generation must not block the next request's start
        for request in requests:
            with self.lock:
                self.inflight += 1
            threading.Thread(target=self._run, args=(request,), daemon=True).start()
        return None

    def finalize(self):
        deadline = time.monotonic() + FINALIZE_WAIT_S
        while time.monotonic() < deadline:
            with self.lock:
                if self.inflight == 0:
                    return
            time.sleep(0.1)
        self.logger.log_warn(f"portrait_stream: finalize gave up waiting for {self.inflight} request(s)")
