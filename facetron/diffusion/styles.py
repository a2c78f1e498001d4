"""Styles: a prompt template (FaceChain's "styles"), a negative prompt and
optionally a style LoRA that the runtime-LoRA bank (or the merge) blends in
at ``lora_weight`` beside the user's face LoRA.

This module holds the :class:`Style` record, the built-in styles (always
served, no LoRA) and the rules of a style's fields. Styles added by users
(with their LoRA files) live in the style registry, :mod:`facetron.style_registry`,
which also serves these built-ins.

``{trigger}`` is replaced by the user's trigger token and ``{subject}`` by
the user's caption attributes (e.g. "a beautiful woman").
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass
from pathlib import Path

from facetron import contract
from facetron.errors import InvalidInputError

NEGATIVE = "lowres, blurry, deformed face, bad anatomy, extra limbs, watermark, text, jpeg artifacts"
PROMPT_FIELDS = ("trigger", "subject")


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str
    negative: str = NEGATIVE
    lora: Path | None = None  # style LoRA in facetron's canonical layout (the registry converts at `add`)
    lora_weight: float | None = None  # None: the unet model's w_style (contract.DEFAULT_STYLE_WEIGHT)

    def weight(self, default: float = contract.DEFAULT_STYLE_WEIGHT) -> float:
        """The style LoRA's weight: its own, else ``default`` (the server's w_style)."""
        return default if self.lora_weight is None else self.lora_weight


STYLES: dict[str, Style] = {
    s.name: s
    for s in (
        Style("studio", "a photo of {trigger}, {subject}, studio portrait, soft light, plain background, best quality"),
        Style("business", "a photo of {trigger}, {subject}, business suit, office, professional headshot, best quality"),
        Style("outdoor", "a photo of {trigger}, {subject}, outdoors, golden hour, bokeh, best quality"),
        Style("id_photo", "a photo of {trigger}, {subject}, passport photo, white background, frontal, best quality"),
    )
}
DEFAULT_STYLE = "studio"


def get_style(name: str) -> Style:
    """A built-in style (the registry's :meth:`facetron.style_registry.StyleRegistry.get` adds the installed ones)."""
    if name not in STYLES:
        raise InvalidInputError("style", f"unknown style {name!r}; known: {', '.join(sorted(STYLES))}")
    return STYLES[name]


def style_prompt(style: Style, trigger: str, subject: str = "a person") -> str:
    return style.prompt.format(trigger=trigger, subject=subject)


# ----------------------------------------------------------------------------- the rules of a style's fields


def check_style_name(name: object, label: str = "style") -> str:
    if not isinstance(name, str) or not contract.STYLE_NAME_PATTERN.fullmatch(name):
        raise InvalidInputError(label, f"{name!r} is not a valid style name "
                                       "(1-64 characters from A-Z a-z 0-9 _ -, starting alphanumeric)")
    return name


def check_prompt_template(template: object, label: str = "--prompt") -> str:
    """A non-empty prompt whose only ``{fields}`` are {trigger} and {subject}."""
    if not isinstance(template, str) or not template.strip():
        raise InvalidInputError(label, "is empty")
    _check_length(template, label)
    hint = "use {trigger} and {subject} as placeholders, {{ and }} for literal braces"
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
        unknown = sorted(fields - set(PROMPT_FIELDS))
        if unknown:
            raise InvalidInputError(label, f"has unknown placeholder(s) {', '.join('{' + f + '}' for f in unknown)}; "
                                           + hint)
        template.format(**{f: "" for f in PROMPT_FIELDS})
    except (ValueError, IndexError, KeyError, AttributeError) as exc:
        if isinstance(exc, InvalidInputError):
            raise
        raise InvalidInputError(label, f"is not a valid template ({exc}); {hint}") from None
    return template


def check_negative(negative: object, label: str = "--negative") -> str:
    if not isinstance(negative, str):
        raise InvalidInputError(label, f"must be text, got {type(negative).__name__}")
    return _check_length(negative, label)


def check_style_weight(weight: object, label: str = "--weight") -> float:
    """A style LoRA's weight: a finite number in 0..MAX_STYLE_WEIGHT."""
    try:
        value = float(weight)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InvalidInputError(label, f"must be a number, got {weight!r}") from None
    if not math.isfinite(value) or not 0.0 <= value <= contract.MAX_STYLE_WEIGHT:
        raise InvalidInputError(label, f"must be in 0..{contract.MAX_STYLE_WEIGHT:g}, got {weight!r}")
    return value


def _check_length(text: str, label: str) -> str:
    if len(text.encode("utf-8")) > contract.MAX_PROMPT_BYTES:
        raise InvalidInputError(label, f"is longer than {contract.MAX_PROMPT_BYTES} bytes")
    return text
