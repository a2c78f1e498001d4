"""The ``unet`` model: the runtime-LoRA UNet (serving mode 2); also the code of ``unet_fewstep``
(``export repository --distill-lora``: the same graph contract over the base UNet with a distillation
LoRA merged in; its config names this code as its source, as every ``unet_user_<id>`` names ``unet_user``).

Each batch item names its user (``user_id``; empty = base model), the
registry version its request pinned (``user_version``) and its style; the
bank (:class:`facetron.pipeline.lora_bank.LoraBank`) turns each distinct
item into the graph's LoRA inputs once per request (resolved in ``_read``,
stacked once per dynamic batch in ``_run``). The step cache: a request that
asks for ``deep_feature`` gets a full step that keeps it; one that sends it
runs the shallow graph (opened on first use). A request that sends the
ControlNet's residuals (``mid_block_residual``, ``down_block_residual_*``)
runs the control graph (``<version>/control/``, opened on first use; the plain
graph stays as it is). No torch is imported here."""

from __future__ import annotations

import threading
from functools import partial

import numpy as np

from facetron import metrics
from facetron.contract import (CONTROL_DOWN_RESIDUALS, CONTROL_FOLDER, CONTROL_MID_RESIDUAL, DEEP_FEATURE,
                               MODEL_FILE, SHALLOW_FOLDER, UnetParams)
from facetron.diffusion.lora_inputs import read_lora_manifest
from facetron.errors import InvalidInputError
from facetron.net_runtimes import UNET_ORT_MEMORY, open_runtime
from facetron.pipeline.lora_bank import LoraBank, style_lora
from facetron.pipeline.net_io import (
    NET_BUDGETS,
    check_feed,
    check_finite,
    check_residuals,
    check_sample_sides,
    read_control_layout,
    read_down_factor,
    unet_graph,
)
from facetron.style_registry import styles_for
from facetron.triton.backend import check_callers, get_input, read_params, version_dir
from facetron.triton.batching import item_strings, run_batched, unet_feed
from facetron.users import served_registry

#: feed entry (object array, one (user_id, style) per item) that carries the items' LoRA keys from
#: UnetModel._read to _run, so a dynamic batch stacks its LoRA tensors once, not once per request
LORA_KEYS = "__lora_keys__"
#: feed entry marking a request that asked for the deep_feature output (a full step of the step cache);
#: run_batched groups requests by their feed's names, so full, shallow and plain steps run as separate batches
WANTS_FEATURE = "__wants_deep_feature__"


class OptionalGraph:
    """A graph beside the unet's plain one (the step cache's shallow graph, the ControlNet's control
    graph), opened on the first request that needs it; a repository without it refuses that request
    with ``missing`` = (input name, rule). ``inputs``: the feed names the graph reads."""

    def __init__(self, path, open_graph, missing: tuple[str, str], lock: threading.Lock):
        self.path, self._open, self._missing, self._lock = path, open_graph, missing, lock
        self.session = None
        self.inputs: frozenset[str] = frozenset()

    def get(self):
        with self._lock:
            if self.session is None:
                if not self.path.is_file():
                    raise InvalidInputError(*self._missing)
                self.session = self._open(self.path)
                self.inputs = frozenset(spec.name for spec in self.session.get_inputs())
            return self.session

    def noise_pred(self, feed: dict) -> dict:
        """noise_pred of this graph on the entries of ``feed`` it reads."""
        return {"noise_pred": self.get().run(["noise_pred"], {k: v for k, v in feed.items() if k in self.inputs})[0]}


class UnetModel:
    def initialize(self, args):
        params = read_params(args, UnetParams)
        folder = version_dir(args)
        # ONNX Runtime or OpenVINO (params.runtime): the LoRA tensors are plain graph inputs in both; the bank
        # hands the same stacked arrays back while a batch's users repeat (every denoising step), and
        # reuse_inputs keeps them bound in the runtime instead of passing ~65 inputs again on every call
        self.session = open_runtime(unet_graph(folder, params), params.runtime, params.intra_op_threads or None,
                                    params.providers, reuse_inputs=True, precision=params.precision, memory=UNET_ORT_MEMORY,
                                    fallback_path=folder / MODEL_FILE)
        # the step cache's shallow graph (it reads fewer LoRA inputs than the full graph) and the ControlNet's
        # graph (the residuals added): each opened on the first request that needs it
        open_graph = partial(open_runtime, runtime=params.runtime, threads=params.intra_op_threads or None,
                             providers=params.providers, reuse_inputs=True, precision=params.precision,
                             memory=UNET_ORT_MEMORY)
        lock = threading.Lock()
        self.shallow = OptionalGraph(folder / SHALLOW_FOLDER / MODEL_FILE, open_graph, (
            DEEP_FEATURE, "this unet has no step-cache shallow graph (re-assemble the repository to serve "
                          "cache_interval > 1)"), lock)
        self.control = OptionalGraph(folder / CONTROL_FOLDER / MODEL_FILE, open_graph, (
            CONTROL_MID_RESIDUAL, "this unet has no ControlNet graph (assemble the repository with --controlnet DIR)"),
            lock)
        self._control_layout: dict | None = None
        # the sides its graphs run (their io.json, written at export): the shallow and control graphs are the same UNet's
        self.down_factor = read_down_factor(folder)
        registry = served_registry(params.users_dir)
        self.registry = registry
        styles = styles_for(registry.root)
        self.bank = LoraBank(
            read_lora_manifest(folder),
            registry,
            partial(style_lora, styles=styles, w_style=params.w_style),
            w_face=params.w_face,
            max_bytes=int(params.lora_cache_mb * (1 << 20)),
            style_version=styles.version,
        )
        metrics.install(args["model_name"])

    def _read(self, request):
        """The UNet inputs + each item's (user, style) under :data:`LORA_KEYS`; the bank entries are
        built here (a bad user or style fails this request only), stacked once per batch in :meth:`_run`."""
        feed = check_feed(unet_feed(request), self.session)
        check_sample_sides(feed["sample"], self.down_factor)
        n = feed["sample"].shape[0]
        feature = get_input(request, DEEP_FEATURE, dtype=np.float32, ndim=4, required=False)
        if feature is not None:  # a shallow step on a cached feature
            if feature.shape[0] != n:
                raise InvalidInputError(DEEP_FEATURE, f"expected one feature per batch item ({n}), got {feature.shape[0]}")
            if feature.shape[2:] != feed["sample"].shape[2:]:  # bounded by sample's budget
                raise InvalidInputError(DEEP_FEATURE, f"expected the sample's sides {list(feed['sample'].shape[2:])}, "
                                                      f"got {list(feature.shape[2:])}")
            feed[DEEP_FEATURE] = check_finite(feature, DEEP_FEATURE)
            check_feed({DEEP_FEATURE: feature}, self.shallow.get())
        elif DEEP_FEATURE in request.requested_output_names():  # a full step that keeps its feature
            feed[WANTS_FEATURE] = np.ones(n, bool)
        residuals = {name: arr for name in CONTROL_DOWN_RESIDUALS + (CONTROL_MID_RESIDUAL,)
                     if (arr := get_input(request, name, dtype=np.float32, ndim=4, required=False)) is not None}
        if residuals:  # a ControlNet step: the control graph, the whole UNet (noise_pred only)
            if DEEP_FEATURE in feed:
                raise InvalidInputError(CONTROL_MID_RESIDUAL, "a ControlNet step runs the whole UNet: the step "
                                                              "cache's deep_feature does not go with it")
            feed.pop(WANTS_FEATURE, None)
            self.control.get()  # the graph is there (else refused), and its layout beside it
            feed.update(check_residuals(residuals, feed["sample"], self.control_layout()))
        users = item_strings(request, "user_id", n)
        check_callers(request, self.registry, users)  # each named user is the caller's own (its token)
        items = zip(users, item_strings(request, "style", n), item_strings(request, "user_version", n))
        keys = np.empty(n, dtype=object)
        for i, key in enumerate(self.bank.keys(list(items))):  # resolved once per distinct item, here only
            keys[i] = key  # element-wise: numpy would read a list of tuples as an [n, 4] array
        for key in dict.fromkeys(keys):  # built now: a bad user or style fails this request only
            self.bank.entry(key)
        feed[LORA_KEYS] = keys
        return feed

    def control_layout(self) -> dict:
        """The control graph's residual layout (read once, after the graph opened)."""
        if self._control_layout is None:
            self._control_layout = read_control_layout(self.control.path.parent)
        return self._control_layout

    def _run(self, feed):
        feed = dict(feed)
        feed.update(self.bank.batch(list(feed.pop(LORA_KEYS))))  # the keys _read resolved; same arrays while they repeat
        if CONTROL_MID_RESIDUAL in feed:  # a ControlNet step: the graph that adds the residuals
            return self.control.noise_pred(feed)
        if DEEP_FEATURE in feed:  # shallow step: the graph reads only some of the LoRA inputs
            return self.shallow.noise_pred(feed)
        outputs = ["noise_pred", DEEP_FEATURE] if feed.pop(WANTS_FEATURE, None) is not None else ["noise_pred"]
        return dict(zip(outputs, self.session.run(outputs, feed)))

    def execute(self, requests):
        return run_batched(requests, self._read, self._run, NET_BUDGETS["unet"])

    def finalize(self):
        self.session = self.bank = None
        metrics.uninstall()
