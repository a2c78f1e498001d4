"""The ``portrait_stream`` model (decoupled): ``portrait`` with step progress.

Runs portrait's path (:func:`facetron.pipeline.portrait.run_portrait`) and
streams ``progress = [done, total]`` after every denoising step, then one
final response with portrait's outputs. Lifecycle as in Triton's decoupled
example: the transaction policy is checked in ``initialize``, in-flight
requests are counted under a lock (at most ``max_streams``: more are
answered UNAVAILABLE at once, never queued on unbounded threads), a stream
whose client cancelled stops between denoising steps, and ``finalize``
waits for the streams still running."""

from __future__ import annotations

import threading
import time

import numpy as np

from facetron import contract, metrics
from facetron.contract import StreamParams
from facetron.errors import FacetronError, ServerError
from facetron.pipeline.portrait import run_portrait
from facetron.request import PortraitRequest
from facetron.triton import bls
from facetron.triton.backend import (
    cancel_check,
    error_response,
    is_decoupled,
    pb,
    typed_request,
    response,
    user_token,
)
from facetron.triton.generator import ServedGenerator

FINALIZE_WAIT_S = 30.0


class PortraitStreamModel:
    def initialize(self, args):
        if not is_decoupled(args):
            raise FacetronError(f"{args['model_name']}: needs a decoupled model transaction policy "
                                "(model_transaction_policy {{ decoupled: true }})")
        self.generator = ServedGenerator.from_args(args, StreamParams)
        self.max_streams = max(1, self.generator.params.max_streams)
        self.logger = pb().Logger
        self.inflight = 0
        self.lock = threading.Lock()
        metrics.install(args["model_name"])

    def _run(self, request, sender):
        final = pb().TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            cancelled = cancel_check(request, contract.PORTRAIT_STREAM.name)

            def progress(done: int, total: int) -> None:
                cancelled(done, total)
                sender.send(response({"progress": np.array([done, total], np.int32)}))

            portrait = typed_request(request, PortraitRequest)
            generator = self.generator.acting_for(user_token(request))  # the caller's own user only
            out = run_portrait(portrait, generator, progress, detect=bls.detect, embed=bls.embed,
                               rules=self.generator.rules)
            sender.send(response(out), flags=final)
        except Exception as exc:  # noqa: BLE001 - every error must reach the client
            sender.send(error_response(exc), flags=final)
        finally:
            with self.lock:
                self.inflight -= 1

    def execute(self, requests):
        # each admitted request runs on its own thread (a long generation must not
        # block the next request's start); at most max_streams run at once
        final = pb().TRITONSERVER_RESPONSE_COMPLETE_FINAL
        for request in requests:
            sender = request.get_response_sender()
            with self.lock:
                admitted = self.inflight < self.max_streams
                self.inflight += admitted
            if not admitted:
                busy = ServerError(f"{contract.PORTRAIT_STREAM.name}: {self.max_streams} streams already running "
                                   "(this server's limit); retry later or use another server")
                sender.send(error_response(busy), flags=final)
                continue
            threading.Thread(target=self._run, args=(request, sender), daemon=True).start()
        return None

    def finalize(self):
        deadline = time.monotonic() + FINALIZE_WAIT_S
        while self.inflight and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.inflight:
            self.logger.log_warn(f"portrait_stream: finalize gave up waiting for {self.inflight} request(s)")
        metrics.uninstall()
