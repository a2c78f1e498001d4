"""Hyper-parameters of the identity LoRA, with FaceChain's defaults.

FaceChain (``train_text_to_image_lora.py``) trains a rank-4 / alpha-32 LoRA
on the UNet attention projections with AdamW at 1.5e-4, a cosine schedule
without warm-up, batch size 1 and ``min(200 x photos, 800)`` steps. The text
encoder LoRA (rank 32) exists there but is off by default; so here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from facetron.errors import InvalidInputError

DEFAULT_TRIGGER_TOKEN = "<facetron-user>"
UNET_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj")
MIXED_PRECISION = ("no", "bf16", "fp16")

STEPS_PER_PHOTO = 200
MAX_AUTO_STEPS = 800


@dataclass
class LoraTrainConfig:
    """Everything that decides the trained weights (plus checkpoint cadence).

    ``steps=None`` means FaceChain's rule, resolved by :meth:`resolve_steps`
    once the number of photos is known. ``resolution=None`` means the base
    model's own resolution. ``mixed_precision`` applies on CUDA only; on CPU
    training is always float32.
    """

    rank: int = 4
    alpha: float = 32.0
    target_modules: tuple[str, ...] = UNET_TARGET_MODULES
    text_encoder_rank: int = 0  # 0 = frozen text encoder (FaceChain's default)
    text_encoder_alpha: float = 32.0
    text_encoder_target_modules: tuple[str, ...] = TEXT_ENCODER_TARGET_MODULES
    learning_rate: float = 1.5e-4
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    steps: int | None = None
    batch_size: int = 1
    seed: int = 42
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    identity_snapshots: int = 0  # N >= 1: keep the LoRA at N evenly spaced steps (candidates for selection by identity)
    mixed_precision: str = "no"
    resolution: int | None = None
    random_flip: bool = True
    trigger_token: str = DEFAULT_TRIGGER_TOKEN
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes copied to the sidecar

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        self.text_encoder_target_modules = tuple(self.text_encoder_target_modules)
        self.validate()

    def validate(self) -> None:
        """Raise InvalidInputError naming the first field that breaks its rule."""
        positive_ints = {"rank": self.rank, "batch_size": self.batch_size, "checkpoint_every": self.checkpoint_every,
                         "keep_checkpoints": self.keep_checkpoints}
        for name, value in positive_ints.items():
            if not isinstance(value, int) or value < 1:
                raise InvalidInputError(name, f"must be an integer >= 1, got {value!r}")
        if not isinstance(self.text_encoder_rank, int) or self.text_encoder_rank < 0:
            raise InvalidInputError("text_encoder_rank", f"must be an integer >= 0, got {self.text_encoder_rank!r}")
        if not isinstance(self.identity_snapshots, int) or self.identity_snapshots < 0:
            raise InvalidInputError("identity_snapshots",
                                    f"must be an integer >= 0 (0 = off), got {self.identity_snapshots!r}")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise InvalidInputError("steps", f"must be an integer >= 1 or None, got {self.steps!r}")
        for name in ("alpha", "text_encoder_alpha", "learning_rate"):
            if not float(getattr(self, name)) > 0:
                raise InvalidInputError(name, f"must be > 0, got {getattr(self, name)!r}")
        if self.lr_warmup_steps < 0:
            raise InvalidInputError("lr_warmup_steps", f"must be >= 0, got {self.lr_warmup_steps!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise InvalidInputError("mixed_precision",
                                    f"must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise InvalidInputError("resolution", f"must be a multiple of 8 (>= 8), got {self.resolution!r}")
        if not self.target_modules:
            raise InvalidInputError("target_modules", "must name at least one module")
        if not isinstance(self.trigger_token, str) or not self.trigger_token.strip():
            raise InvalidInputError("trigger_token", "must be a non-empty string")

    @property
    def train_text_encoder(self) -> bool:
        return self.text_encoder_rank > 0

    def resolve_steps(self, num_photos: int) -> int:
        """Steps to train: the given ``steps``, else ``min(200 x photos, 800)``."""
        if self.steps is not None:
            return self.steps
        return max(1, min(STEPS_PER_PHOTO * num_photos, MAX_AUTO_STEPS))

    def snapshot_steps(self, total_steps: int) -> list[int]:
        """The steps whose LoRA is kept as a candidate: ``identity_snapshots``
        evenly spaced steps ending at the last (empty when off)."""
        n = self.identity_snapshots
        if n == 0:
            return []
        if n > total_steps:
            raise InvalidInputError("identity_snapshots", f"{n} candidates need at least {n} training steps, "
                                                          f"got {total_steps}")
        return sorted({max(1, round(total_steps * k / n)) for k in range(1, n + 1)})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        d["text_encoder_target_modules"] = list(self.text_encoder_target_modules)
        return d

    def unet_lora_config(self):
        """peft ``LoraConfig`` for the UNet (B starts at zero: ``gaussian`` init)."""
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, init_lora_weights="gaussian",
                          target_modules=list(self.target_modules))

    def text_encoder_lora_config(self):
        """peft ``LoraConfig`` for the CLIP text encoder (only if ``text_encoder_rank > 0``)."""
        from peft import LoraConfig

        return LoraConfig(r=self.text_encoder_rank, lora_alpha=self.text_encoder_alpha, init_lora_weights="gaussian",
                          target_modules=list(self.text_encoder_target_modules))

    def fingerprint(self) -> dict[str, Any]:
        """Fields that must match for a checkpoint to be resumed (not cadence/notes)."""
        d = self.to_dict()
        for k in ("checkpoint_every", "keep_checkpoints", "identity_snapshots", "extra"):
            d.pop(k)
        return d
