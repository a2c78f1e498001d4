"""A typed request (:mod:`facetron.request`) resolved against this server,
once: the base model's defaults filled in, the compute budget checked, the
user pinned at one registry version (:meth:`facetron.users.UserRegistry.pin`),
the style's prompt written out. The rest of the call reads the job and
looks nothing up again."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from facetron import contract
from facetron.contract import GeneratorParams
from facetron.diffusion.sampler import GenerationRequest
from facetron.diffusion.styles import DEFAULT_STYLE, style_prompt
from facetron.errors import InvalidInputError
from facetron.request import GeneratorRequest, PortraitRequest
from facetron.style_registry import StyleRegistry, styles_for
from facetron.users import DEFAULT_SUBJECT, PinnedUser, UserRegistry


@dataclass(frozen=True)
class GenerationJob:
    """What the generator runs: one request, resolved."""

    request: GeneratorRequest  # as sent (checked)
    prompt: str
    negative_prompt: str
    user: Optional[PinnedUser]  # None = the base model
    style: str
    sampling: GenerationRequest  # the sampler's settings, this server's defaults filled in
    seed_source: str  # "request" | "random ..."
    vae: str = contract.DEFAULT_VAE  # contract.VAE_CHOICES: which autoencoder decodes (and encodes a template)

    @property
    def user_id(self) -> str:
        return self.user.user_id if self.user is not None else ""

    @property
    def user_version(self) -> str:
        return self.user.version if self.user is not None else ""

    @property
    def template(self) -> Optional[np.ndarray]:
        return self.request.template


@dataclass(frozen=True)
class PortraitJob:
    """A portrait call: the generation + what ranking and fusion read."""

    generation: GenerationJob
    top_k: int  # 0 = all
    fusion_strength: float  # 0 = no fusion
    reference: np.ndarray  # the user's reference embedding [1, 128] (the pinned version's)

    @property
    def user(self) -> PinnedUser:
        assert self.generation.user is not None  # a PortraitRequest always names its user
        return self.generation.user


def build_job(request: GeneratorRequest, info: dict, registry: UserRegistry,
              params: GeneratorParams = GeneratorParams(), styles: StyleRegistry | None = None,
              token: str | None = None) -> GenerationJob:
    """Resolve a checked request against this server (errors name the input); ``token``: the
    caller's per-user token (a served registry opens a user only with it)."""
    # 1. the autoencoder (the tiny one only where this repository serves it) and the style (built-in or
    # installed; unknown: INVALID_ARGUMENT, before any user lookup)
    vae = request.vae or contract.DEFAULT_VAE
    if vae == "tiny" and not info.get("tiny_vae"):
        raise InvalidInputError("vae", "tiny: this repository has no tiny autoencoder "
                                       "(export repository --tiny-vae DIR)")
    style_name = request.style or DEFAULT_STYLE
    style = (styles or styles_for(registry.root)).get(style_name)
    # 2. the user, pinned at its served version (NotFoundError for an unknown user), and the prompts
    user = registry.pin(request.user_id, token) if request.user_id else None
    trigger, subject = user.identity_text() if user is not None else (DEFAULT_SUBJECT, DEFAULT_SUBJECT)
    prompt = style_prompt(style, trigger, subject) if request.prompt is None \
        else request.prompt.replace("{trigger}", trigger)
    negative = style.negative if request.negative_prompt is None else request.negative_prompt
    # 3. sampling: this server's defaults for what the request left out, then its limits and budget
    native = int(info["resolution"])

    def given(name: str, default):
        value = getattr(request, name)
        return default if value is None else value

    # no seed given: a fresh random one (OS entropy), returned in portrait's report so the call can be repeated
    seed = request.seed if request.seed is not None else int(np.random.SeedSequence().entropy % 2**31)
    sampling = GenerationRequest(
        num_images=given("num_images", contract.DEFAULT_NUM_IMAGES),
        steps=given("steps", params.default_steps),
        guidance=given("guidance", params.default_guidance),
        seed=seed,
        height=given("height", native),
        width=given("width", native),
        scheduler=given("scheduler", contract.DEFAULT_SCHEDULER),
        strength=given("strength", contract.DEFAULT_STRENGTH),
        cache_interval=given("cache_interval", contract.DEFAULT_CACHE_INTERVAL),
    )
    sampling.validate(int(info["latent_factor"]), params.max_images)
    contract.check_budget(num_images=sampling.num_images, steps=sampling.steps, height=sampling.height,
                          width=sampling.width, native=native, max_side_factor=params.max_side_factor,
                          max_work=params.max_work)
    seed_source = "request" if request.seed is not None else "random (repeat the call with this seed)"
    return GenerationJob(request, prompt, negative, user, style_name, sampling, seed_source, vae)


def build_portrait_job(request: PortraitRequest, info: dict, registry: UserRegistry,
                       params: GeneratorParams = GeneratorParams(),
                       styles: StyleRegistry | None = None, token: str | None = None) -> PortraitJob:
    """A portrait request resolved: the generation job + the pinned user's reference embedding."""
    generation = build_job(request, info, registry, params, styles, token)  # top_k <= num_images: PortraitRequest.check
    return PortraitJob(generation, request.top_k or 0, request.strength_of_fusion,
                       generation.user.reference_embedding())
