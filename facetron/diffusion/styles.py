"""Style presets: prompt templates (FaceChain's "styles"), optionally with a
style LoRA that the merge / runtime-LoRA step blends in at ``weight``.

``{trigger}`` is replaced by the user's trigger token and ``{subject}`` by
the user's caption attributes (e.g. "a beautiful woman").
"""

from __future__ import annotations

from dataclasses import dataclass

from facetron.errors import InvalidInputError

NEGATIVE = "lowres, blurry, deformed face, bad anatomy, extra limbs, watermark, text, jpeg artifacts"


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str
    negative: str = NEGATIVE
    lora: str | None = None  # path of a style LoRA (diffusers or kohya .safetensors)
    lora_weight: float = 0.25  # FaceChain's default style weight


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
    if name not in STYLES:
        raise InvalidInputError("style", f"unknown style {name!r}; known: {', '.join(sorted(STYLES))}")
    return STYLES[name]


def style_prompt(style: Style, trigger: str, subject: str = "a person") -> str:
    return style.prompt.format(trigger=trigger, subject=subject)
