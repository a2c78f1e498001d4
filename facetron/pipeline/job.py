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
    unet: str = contract.UNET.name  # the served UNet model that denoises (unet_model)
    #: that UNet's input channels where it is an inpainting UNet (unet_inpaint: 9 for SD-1.5), else None (4-channel)
    unet_in_channels: Optional[int] = None

    @property
    def user_id(self) -> str:
        return self.user.user_id if self.user is not None else ""

    @property
    def paste_template(self) -> bool:
        """Template mode: put the template's own pixels back outside its face region (request input)."""
        return bool(self.request.paste_template)

    @property
    def user_version(self) -> str:
        return self.user.version if self.user is not None else ""

    @property
    def template(self) -> Optional[np.ndarray]:
        return self.request.template

    @property
    def control(self) -> tuple[str, float]:
        """Template mode's ControlNet: (contract.CONTROL_CHOICES, its scale); ("none", ...) = none."""
        return self.sampling.control, self.sampling.control_scale


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


def unet_model(scheduler: str, info: dict, identity_mode: str = contract.IDENTITY_MODES[0], user_id: str = "",
               template: bool = False) -> str:
    """The served UNet model a request denoises on: ``unet_fewstep`` for a few-step scheduler where this
    repository serves a distillation LoRA's UNet (``model_info.json``'s ``distill_lora``; in both identity
    modes: the user's LoRA rides on it at run time); else in template mode (``template``) ``unet_inpaint`` where
    this repository serves an inpainting UNet (``model_info.json``'s ``inpaint_unet``; in both identity modes,
    the user's LoRA from its bank: every template-mode request of such a repository runs on it, there is no
    request input to choose); else in merged mode the user's ``unet_user_<id>``; else the runtime-LoRA ``unet``
    (a few-step scheduler on a repository without a distillation LoRA runs there too)."""
    if scheduler in contract.FEW_STEP_SCHEDULERS and info.get(contract.DISTILL_INFO):
        return contract.UNET_FEWSTEP.name
    if template and info.get(contract.INPAINT_INFO):
        return contract.UNET_INPAINT.name
    if identity_mode == "merged" and user_id:
        return contract.merged_unet_name(user_id)
    return contract.UNET.name


def unet_down_factor(info: dict) -> int:
    """The served UNets' down factor (:data:`facetron.contract.UNET_DOWN_FACTOR`: the generator puts their graphs'
    record into its info, :class:`facetron.triton.generator.ServedGenerator`); absent (a repository exported
    before it was recorded, or an info without it): :data:`~facetron.contract.DEFAULT_UNET_DOWN_FACTOR`."""
    return int(info.get(contract.UNET_DOWN_FACTOR) or contract.DEFAULT_UNET_DOWN_FACTOR)


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
    # template mode's ControlNet, only where this repository serves one (model_info.json's controlnet)
    control = request.control or contract.DEFAULT_CONTROL
    if control != contract.DEFAULT_CONTROL and not info.get("controlnet"):
        raise InvalidInputError("control", f"{control}: this repository has no ControlNet "
                                           "(export repository --controlnet DIR)")
    style_name = request.style or DEFAULT_STYLE
    style = (styles or styles_for(registry.root)).get(style_name)
    # 2. the user, pinned at its served version (NotFoundError for an unknown user), and the prompts
    user = registry.pin(request.user_id, token) if request.user_id else None
    trigger, subject = user.identity_text() if user is not None else (DEFAULT_SUBJECT, DEFAULT_SUBJECT)
    prompt = style_prompt(style, trigger, subject) if request.prompt is None \
        else request.prompt.replace("{trigger}", trigger)
    negative = style.negative if request.negative_prompt is None else request.negative_prompt
    # 3. sampling: this server's defaults for what the request left out, then its limits (sides the served UNets
    # run: multiples of the VAE's px per cell x the UNet's down factor) and budget
    native = int(info["resolution"])

    def given(name: str, default):
        value = getattr(request, name)
        return default if value is None else value

    # no seed given: a fresh random one (OS entropy), returned in portrait's report so the call can be repeated
    seed = request.seed if request.seed is not None else int(np.random.SeedSequence().entropy % 2**31)
    few_step = given("scheduler", contract.DEFAULT_SCHEDULER) in contract.FEW_STEP_SCHEDULERS
    sampling = GenerationRequest(
        num_images=given("num_images", contract.DEFAULT_NUM_IMAGES),
        steps=given("steps", contract.FEW_STEP_DEFAULT_STEPS if few_step else params.default_steps),
        guidance=given("guidance", contract.FEW_STEP_DEFAULT_GUIDANCE if few_step else params.default_guidance),
        seed=seed,
        height=given("height", native),
        width=given("width", native),
        scheduler=given("scheduler", contract.DEFAULT_SCHEDULER),
        strength=given("strength", contract.DEFAULT_STRENGTH),
        cache_interval=given("cache_interval", contract.DEFAULT_CACHE_INTERVAL),
        control=control,
        control_scale=given("control_scale", contract.DEFAULT_CONTROL_SCALE),
    )
    sampling.validate(int(info["latent_factor"]), params.max_images)
    contract.check_model_sides(sampling.height, sampling.width, int(info["latent_factor"]), unet_down_factor(info))
    contract.check_budget(num_images=sampling.num_images, steps=sampling.steps, height=sampling.height,
                          width=sampling.width, native=native, max_side_factor=params.max_side_factor,
                          max_work=params.max_work)
    seed_source = "request" if request.seed is not None else "random (repeat the call with this seed)"
    # 4. the UNet model: the few-step one for lcm / tcd, the inpainting one in template mode, where the repository
    # serves them; what the inpainting UNet has no graphs for is refused here, before the template is fitted
    unet = unet_model(sampling.scheduler, info, params.identity_mode, user.user_id if user is not None else "",
                      template=request.template is not None)
    if control != contract.DEFAULT_CONTROL and unet != contract.UNET.name:
        raise InvalidInputError("control", f"the ControlNet's residuals are taken by the runtime-LoRA {contract.UNET.name} "
                                           f"only; this request would denoise on {unet} (merged mode, a few-step "
                                           "scheduler's UNet or the repository's inpainting UNet)")
    in_channels = None
    if unet == contract.UNET_INPAINT.name:
        in_channels = int(info[contract.INPAINT_INFO].get("in_channels", contract.INPAINT_UNET_CHANNELS))
        if sampling.cache_interval != 1:
            raise InvalidInputError("cache_interval", f"step caching has no graphs for the inpainting UNet "
                                                      f"({contract.UNET_INPAINT.name}) this repository's template mode "
                                                      "runs on: use 1")
    return GenerationJob(request, prompt, negative, user, style_name, sampling, seed_source, vae, unet=unet,
                         unet_in_channels=in_channels)


def build_portrait_job(request: PortraitRequest, info: dict, registry: UserRegistry,
                       params: GeneratorParams = GeneratorParams(),
                       styles: StyleRegistry | None = None, token: str | None = None) -> PortraitJob:
    """A portrait request resolved: the generation job + the pinned user's reference embedding."""
    generation = build_job(request, info, registry, params, styles, token)  # top_k <= num_images: PortraitRequest.check
    return PortraitJob(generation, request.top_k or 0, request.strength_of_fusion,
                       generation.user.reference_embedding())
