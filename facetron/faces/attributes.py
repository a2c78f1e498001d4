"""Face attributes for captions: pluggable, never invented.

Two providers share one interface (``predict(faces) -> list[dict]``):

* :class:`UserAttributes` — what the user said (``--attr gender=woman
  --attr age=30s``). Used when no attribute weights are given; every
  result says ``source: user``.
* :class:`FairFaceAttributes` — a FairFace-style ResNet34 head (7 race, 2
  gender, 9 age logits, torchvision ResNet34 layout, 224² input) loaded from
  a user-given weights file. No such weights ship in any
  package here, so facetron never guesses attributes on its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import cv2
import numpy as np
import torch
from torch import nn

from facetron.errors import InvalidInputError, NotFoundError

FAIRFACE_RACES = ("White", "Black", "Latino_Hispanic", "East Asian", "Southeast Asian", "Indian", "Middle Eastern")
FAIRFACE_GENDERS = ("man", "woman")
FAIRFACE_AGES = ("0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "70+")
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
_ATTR_RE = re.compile(r"^([a-z_]{1,32})=([\w \-+']{1,48})$")


class AttributeProvider(Protocol):
    def predict(self, faces: Sequence[np.ndarray]) -> list[dict[str, str]]: ...


def parse_attr_flags(flags: Sequence[str]) -> dict[str, str]:
    """``["gender=woman", "age=30s"]`` -> dict; each flag must be key=value."""
    out: dict[str, str] = {}
    for flag in flags:
        m = _ATTR_RE.match(flag.strip())
        if not m:
            raise InvalidInputError(
                f"--attr {flag!r}", "expected key=value (key: lowercase letters/underscore, value: words)"
            )
        out[m.group(1)] = m.group(2).strip()
    return out


@dataclass
class UserAttributes:
    """Attributes given by the user, applied to every face."""

    values: dict[str, str] = field(default_factory=dict)

    def predict(self, faces: Sequence[np.ndarray]) -> list[dict[str, str]]:
        return [dict(self.values, source="user") for _ in faces]


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + idt)


class FairFaceResNet34(nn.Module):
    """ResNet34 with torchvision's parameter names and an 18-logit head."""

    stages = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))

    def __init__(self, num_outputs: int = 18):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, (width, blocks, stride) in enumerate(self.stages, start=1):
            layers = [_BasicBlock(cin, width, stride)] + [_BasicBlock(width, width, 1) for _ in range(blocks - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*layers))
            cin = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def load_fairface(path: str | Path) -> FairFaceResNet34:
    """Load a FairFace-style state dict (.pt via weights_only, or .safetensors)."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"attribute weights {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = FairFaceResNet34(num_outputs=state["fc.weight"].shape[0] if "fc.weight" in state else 18)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InvalidInputError(
            str(path), f"not a FairFace ResNet34 state dict (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.eval()


def preprocess_faces(faces: Sequence[np.ndarray]) -> np.ndarray:
    """RGB uint8 face crops -> float32 [N,3,224,224], ImageNet-normalised."""
    batch = np.stack([cv2.resize(f, (224, 224), interpolation=cv2.INTER_AREA) for f in faces]).astype(np.float32)
    batch = (batch / 255.0 - _IMAGENET_MEAN) / _IMAGENET_STD
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))


def decode_logits(logits: np.ndarray) -> list[dict[str, str]]:
    """18 FairFace logits per face -> race, gender, age labels."""
    out = []
    for row in np.asarray(logits):
        out.append(
            {
                "race": FAIRFACE_RACES[int(np.argmax(row[0:7]))],
                "gender": FAIRFACE_GENDERS[int(np.argmax(row[7:9]))],
                "age": FAIRFACE_AGES[int(np.argmax(row[9:18]))],
                "source": "fairface",
            }
        )
    return out


class FairFaceAttributes:
    """Attribute head from a user-given weights file, run in torch."""

    def __init__(self, weights: str | Path):
        self.model = load_fairface(weights)

    @torch.no_grad()
    def predict(self, faces: Sequence[np.ndarray]) -> list[dict[str, str]]:
        if not faces:
            return []
        logits = self.model(torch.from_numpy(preprocess_faces(faces))).numpy()
        return decode_logits(logits)
