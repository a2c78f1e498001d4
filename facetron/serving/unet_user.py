"""The merged ``unet_user_<id>`` models (serving mode 1): one user's UNet with
the face (+ style) LoRA fused in; the code of every such model
(``model_repository/unet_user``)."""

from __future__ import annotations

from facetron import contract
from facetron.contract import GeneratorParams
from facetron.net_runtimes import UNET_ORT_MEMORY
from facetron.pipeline.net_io import NET_BUDGETS, check_feed, check_sample_sides, read_down_factor
from facetron.triton.backend import check_callers, repository_dir, version_dir
from facetron.triton.batching import net_session, run_batched, unet_feed
from facetron.triton.generator import model_params
from facetron.users import served_registry


class UnetUserModel:
    """One user's merged UNet (serving mode 1, ``unet_user_<id>``): FaceChain's
    way, the user's face (+ style) LoRA fused into the weights, one model per
    user, loaded on demand with explicit model control. The scalable default
    is the runtime-LoRA ``unet``; this mode suits few users."""

    def initialize(self, args):
        self.session = net_session(args, memory=UNET_ORT_MEMORY)  # a UNet keeps its arena (net_runtimes)
        self.down_factor = read_down_factor(version_dir(args))  # the sides its graph runs (io.json)
        self.user_id = args["model_name"].removeprefix(contract.MERGED_UNET_PREFIX)  # this model's one user
        # the registry of this repository's generator (whose requests this model serves)
        users_dir = model_params(repository_dir(args), contract.PORTRAIT_GENERATOR.name, GeneratorParams).users_dir
        self.registry = served_registry(users_dir)

    def _run(self, feed):
        return {"noise_pred": self.session.run(["noise_pred"], feed)[0]}

    def _read(self, request):
        check_callers(request, self.registry, [self.user_id])  # generates with this user's identity: its token
        feed = check_feed(unet_feed(request), self.session)
        check_sample_sides(feed["sample"], self.down_factor)
        return feed

    def execute(self, requests):
        return run_batched(requests, self._read, self._run, NET_BUDGETS["unet"])

    def finalize(self):
        self.session = None
