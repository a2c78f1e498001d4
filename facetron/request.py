"""The typed request of each generating entry point, parsed and checked once.

``portrait_generator`` takes a :class:`GeneratorRequest`, ``portrait`` and
``portrait_stream`` a :class:`PortraitRequest`: every input the contract
names (:data:`facetron.contract.GENERATION_INPUTS` +
:data:`facetron.contract.PORTRAIT_EXTRA_INPUTS`), ``None`` where the caller
left it to the server's default. Built from the wire once
(:meth:`GeneratorRequest.from_arrays`, inside the served model) or by the
client (keyword arguments, then :meth:`GeneratorRequest.to_arrays`): both
run the same :meth:`check`, in the spirit of diffusers' ``check_inputs``:
every rule that needs no server state, each error naming the input, before
any work. What needs the server (the base model's resolution and budget,
the registry, the styles) is resolved once by
:mod:`facetron.pipeline.job`.

Also here: one-element string / scalar tensors decoded and checked (the
wire values of every served model)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from facetron import contract
from facetron.errors import InvalidInputError

# --- wire values ------------------------------------------------------------------------


def decode_utf8(item: Any, name: str) -> str:
    """One BYTES element as text; InvalidInputError naming ``name`` if not UTF-8."""
    if not isinstance(item, bytes):
        return str(item)
    try:
        return item.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(name, f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def one_string(arr: np.ndarray, name: str) -> str:
    """The single UTF-8 string of a one-element BYTES tensor."""
    if arr.size != 1:
        raise InvalidInputError(name, f"expected exactly one string, got shape {list(arr.shape)}")
    return decode_utf8(arr.reshape(-1)[0], name)


def one_scalar(arr: np.ndarray, name: str, dtype):
    """The single value of a one-element numeric tensor of ``dtype``."""
    if arr.dtype != np.dtype(dtype):
        raise InvalidInputError(name, f"expected dtype {np.dtype(dtype)}, got {arr.dtype}")
    if arr.size != 1:
        raise InvalidInputError(name, f"expected one value, got shape {list(arr.shape)}")
    return arr.reshape(-1)[0].item()



def number(value: Any, kind: type, name: str) -> Any:
    """``kind(value)`` (int, float or bool), else InvalidInputError naming ``name`` (an int
    argument given a non-integral number is refused, not truncated)."""
    if kind is bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise InvalidInputError(name, f"expected true or false, got {value!r}")
    if kind is int and isinstance(value, (float, np.floating)) and not float(value).is_integer():
        raise InvalidInputError(name, f"expected an integer, got {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidInputError(name, f"expected a number, got {value!r}") from None


def scalar(value: Any, dtype: Any, name: str) -> np.ndarray:
    """A one-value tensor ``[value]`` of ``dtype``, else InvalidInputError naming ``name``."""
    try:
        return np.array([value], dtype=dtype)
    except (TypeError, ValueError, OverflowError):
        raise InvalidInputError(name, f"expected a number, got {value!r}") from None


def bytes_tensor(values: Sequence[str]) -> np.ndarray:
    """A BYTES tensor of UTF-8 strings."""
    return np.array([v.encode("utf-8") for v in values], dtype=object)


def check_template(template: Any, name: str = "template") -> np.ndarray:
    """A template photo: UINT8 [H, W, 3] within the contract's side limits."""
    if not isinstance(template, np.ndarray) or template.dtype != np.uint8 or template.ndim != 3 \
            or template.shape[2] != 3:
        got = f"{template.dtype} {list(template.shape)}" if isinstance(template, np.ndarray) else type(template).__name__
        raise InvalidInputError(name, f"expected UINT8 [H, W, 3], got {got}")
    if min(template.shape[:2]) < contract.MIN_TEMPLATE_SIDE:
        raise InvalidInputError(name, f"is {template.shape[1]}x{template.shape[0]}; "
                                      f"at least {contract.MIN_TEMPLATE_SIDE} px a side")
    if max(template.shape[:2]) > contract.MAX_TEMPLATE_SIDE:
        raise InvalidInputError(name, f"is {template.shape[1]}x{template.shape[0]}; "
                                      f"at most {contract.MAX_TEMPLATE_SIDE} px a side (resize it first)")
    return np.ascontiguousarray(template)


# --- typed requests ---------------------------------------------------------------------

#: Python type of each contract dtype a one-value input carries
_KINDS = {"STRING": str, "INT32": int, "INT64": int, "FP32": float, "BOOL": bool}
#: Values the server fills in for inputs a request leaves out, for checking the given ones with
#: contract.check_generation (any side in range stands for the model's native one)
_SERVER_FILLS = dict(
    num_images=contract.DEFAULT_NUM_IMAGES, steps=contract.DEFAULT_STEPS, guidance=contract.DEFAULT_GUIDANCE,
    height=contract.MAX_SIDE, width=contract.MAX_SIDE, strength=contract.DEFAULT_STRENGTH,
    scheduler=contract.DEFAULT_SCHEDULER, cache_interval=contract.DEFAULT_CACHE_INTERVAL,
)


@dataclass(frozen=True)
class GeneratorRequest:
    """``portrait_generator``'s inputs (None = the server's default), checked on creation."""

    MODEL: ClassVar[contract.ModelContract] = contract.PORTRAIT_GENERATOR

    user_id: str | None = None  # None or "" = the base model
    prompt: str | None = None  # None = the style's prompt; "{trigger}" = the user's trigger word
    negative_prompt: str | None = None
    style: str | None = None
    scheduler: str | None = None  # contract.SCHEDULERS
    num_images: int | None = None
    seed: int | None = None  # None = a random one, reported (portrait's report)
    steps: int | None = None
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    template: np.ndarray | None = field(default=None, compare=False, repr=False)  # UINT8 [H, W, 3]: template mode
    strength: float | None = None  # template mode: share of the template re-generated
    cache_interval: int | None = None  # step caching: a full UNet every N steps (1 = off)
    vae: str | None = None  # contract.VAE_CHOICES: the autoencoder that decodes (None = contract.DEFAULT_VAE)
    paste_template: bool | None = None  # template mode: the template's pixels back outside the face region
    control: str | None = None  # contract.CONTROL_CHOICES: template mode's ControlNet conditioning (None = none)
    control_scale: float | None = None  # [0, MAX_CONTROL_SCALE]: the ControlNet's weight (None = DEFAULT_CONTROL_SCALE)

    def __post_init__(self) -> None:
        for name, t in self._tensors().items():
            value = getattr(self, name)
            if value is not None and name != "template":
                object.__setattr__(self, name, number(value, _KINDS[t.dtype], name) if t.dtype != "STRING"
                                   else str(value))
        self.check()

    @classmethod
    def _tensors(cls) -> dict[str, contract.Tensor]:
        return {t.name: t for t in cls.MODEL.inputs}

    # 1. the rules -------------------------------------------------------------------------
    def check(self) -> None:
        """Every rule of the contract that needs no server state, each error naming its input."""
        if self.user_id:
            object.__setattr__(self, "user_id", contract.validate_user_id(self.user_id))  # the one check
        if self.prompt is not None and not self.prompt.strip():
            raise InvalidInputError("prompt", "is empty (omit it to use the style's prompt)")
        for name in ("prompt", "negative_prompt"):
            text = getattr(self, name)
            if text is not None and len(text.encode("utf-8")) > contract.MAX_PROMPT_BYTES:
                raise InvalidInputError(name, f"longer than {contract.MAX_PROMPT_BYTES} bytes")
        if self.style and not contract.STYLE_NAME_PATTERN.fullmatch(self.style):
            raise InvalidInputError("style", f"{self.style!r} is not a style name (1-64 characters from "
                                             "A-Z a-z 0-9 _ -, starting alphanumeric)")
        given = {name: getattr(self, name) for name in _SERVER_FILLS if getattr(self, name) is not None}
        contract.check_generation(**{**_SERVER_FILLS, **given}, max_images=contract.MAX_IMAGES)
        if self.seed is not None:
            contract.check_seed(self.seed)
        if self.vae is not None and self.vae not in contract.VAE_CHOICES:
            raise InvalidInputError("vae", f"expected one of {', '.join(contract.VAE_CHOICES)}, got {self.vae!r}")
        if self.template is not None:
            check_template(self.template)
        elif self.strength is not None:
            raise InvalidInputError("strength", "only applies with a template")
        if self.paste_template and self.template is None:
            raise InvalidInputError("paste_template", "only applies with a template")
        self._check_control()

    def _check_control(self) -> None:
        """``control`` one of the choices, only with a template; ``control_scale`` in range, only with a control."""
        control = contract.DEFAULT_CONTROL if self.control is None else self.control
        contract.check_control(control, contract.DEFAULT_CONTROL_SCALE if self.control_scale is None
                               else self.control_scale)
        if control != contract.DEFAULT_CONTROL and self.template is None:
            raise InvalidInputError("control", f"{control}: a ControlNet conditions template mode only (send a "
                                               "template)")
        if self.control_scale is not None and control == contract.DEFAULT_CONTROL:
            raise InvalidInputError("control_scale", "only applies with a control (e.g. control canny)")

    # 2. from and to the wire --------------------------------------------------------------
    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]):
        """The request from its tensors by name (absent = None), parsed and checked once."""
        values: dict[str, Any] = {}
        for name, t in cls._tensors().items():
            arr = arrays.get(name)
            if arr is None:
                continue
            if name == "template":
                values[name] = arr
            elif t.dtype == "STRING":
                values[name] = one_string(arr, name)
            else:
                values[name] = one_scalar(arr, name, contract.NUMPY_DTYPES[t.dtype])
        return cls(**values)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The tensors to send (the inputs left at None are not sent)."""
        out: dict[str, np.ndarray] = {}
        for name, t in self._tensors().items():
            value = getattr(self, name)
            if value is None:
                continue
            if name == "template":
                out[name] = check_template(value)
            elif t.dtype == "STRING":
                out[name] = bytes_tensor([value])
            else:
                out[name] = scalar(value, contract.NUMPY_DTYPES[t.dtype], name)
        return out



@dataclass(frozen=True)
class PortraitRequest(GeneratorRequest):
    """``portrait`` / ``portrait_stream``'s inputs: a user's generation + ranking and fusion."""

    MODEL: ClassVar[contract.ModelContract] = contract.PORTRAIT

    top_k: int | None = None  # 0 or None = every candidate, best first
    fuse: bool | None = None  # False == fusion_strength 0
    fusion_strength: float | None = None  # [0, 1]; None = contract.DEFAULT_FUSION_STRENGTH

    def check(self) -> None:
        if not self.user_id:
            raise InvalidInputError("user_id", "is required: portraits are ranked by the user's identity")
        super().check()
        num_images = contract.DEFAULT_NUM_IMAGES if self.num_images is None else self.num_images
        if self.top_k is not None and not 0 <= self.top_k <= num_images:
            raise InvalidInputError("top_k", f"must be in 0..num_images ({num_images}), got {self.top_k} (0 = all)")
        if self.fusion_strength is not None:
            contract.check_fusion_strength(self.fusion_strength)
            if self.fuse is False and self.fusion_strength > 0:
                raise InvalidInputError("fuse", f"false turns fusion off, but fusion_strength is "
                                                f"{self.fusion_strength:g}: send one of them "
                                                "(fusion_strength 0 == fuse false)")

    @property
    def strength_of_fusion(self) -> float:
        """The fusion strength this request asks for (fuse=false is 0)."""
        if self.fuse is False:
            return 0.0
        return contract.DEFAULT_FUSION_STRENGTH if self.fusion_strength is None else self.fusion_strength
