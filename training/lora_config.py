"""Hyper-parameters of the identity LoRA, with FaceChain's defaults.

FaceChain (``train_text_to_image_lora.py``) trains a rank-4 / alpha-32 LoRA
on the UNet attention projections with AdamW at 1.5e-4, a cosine schedule
without warm-up, batch size 1 and ``min(200 x photos, 800)`` steps. The text
encoder LoRA (rank 32) exists there but is off by default; so here.

Two choices FaceChain does not make: the CPU compute precision
(:func:`choose_precision`: bf16 autocast where the CPU has bf16 matrix
kernels, float32 elsewhere) and an opt-in early stop when the smoothed loss
stops falling (:class:`PlateauRule`; off by default, so FaceChain's step
count stands).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from facetron.contract import NET_PRECISIONS
from facetron.cpu_info import BF16_FLAGS
from facetron.errors import InvalidInputError

DEFAULT_TRIGGER_TOKEN = "<facetron-user>"
UNET_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj")
MIXED_PRECISION = ("no", "bf16", "fp16")
#: ``precision``: the CPU compute precision (the names of ``export repository --precision``), or chosen per machine
PRECISIONS = NET_PRECISIONS + ("auto",)

STEPS_PER_PHOTO = 200
MAX_AUTO_STEPS = 800


@dataclass
class LoraTrainConfig:
    """Everything that decides the trained weights (plus checkpoint cadence).

    ``steps=None`` means FaceChain's rule, resolved by :meth:`resolve_steps`
    once the number of photos is known. ``resolution=None`` means the base
    model's own resolution. ``mixed_precision`` applies on CUDA only;
    ``precision`` decides the CPU compute precision (:func:`choose_precision`).
    ``stop_on_plateau`` > 0 turns on the early stop of :class:`PlateauRule`.
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
    precision: str = "auto"  # PRECISIONS; see choose_precision
    stop_on_plateau: int = 0  # patience in steps; 0 = off (train every step)
    plateau_min_delta: float = 0.01  # an improvement is a fall of the smoothed loss by this fraction of its best
    plateau_window: int = 50  # the smoothed loss: the mean of the last this many step losses
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
        if self.precision not in PRECISIONS:
            raise InvalidInputError("precision", f"must be one of {PRECISIONS}, got {self.precision!r}")
        if not isinstance(self.stop_on_plateau, int) or self.stop_on_plateau < 0:
            raise InvalidInputError("stop_on_plateau", "must be an integer >= 0 (patience in steps; 0 = off), "
                                                       f"got {self.stop_on_plateau!r}")
        if not isinstance(self.plateau_window, int) or self.plateau_window < 1:
            raise InvalidInputError("plateau_window", f"must be an integer >= 1, got {self.plateau_window!r}")
        if not 0 <= float(self.plateau_min_delta) < 1:
            raise InvalidInputError("plateau_min_delta", f"must be in [0, 1), got {self.plateau_min_delta!r}")
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

    def plateau_rule(self) -> "PlateauRule | None":
        """A fresh early-stop tracker for this run (None when ``stop_on_plateau`` is 0)."""
        if not self.stop_on_plateau:
            return None
        return PlateauRule(self.stop_on_plateau, float(self.plateau_min_delta), self.plateau_window)

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


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a run trains in: ``name`` (f32 or bf16), whether the CPU forward runs under bf16
    autocast, what accelerate's ``mixed_precision`` gets (CUDA), and why."""

    name: str
    cpu_autocast: bool
    mixed_precision: str
    why: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose_precision(precision: str, mixed_precision: str, device_type: str, bf16_flags: list[str]) -> PrecisionChoice:
    """The run's precision from ``precision`` (f32 / bf16 / auto) on ``device_type`` (cpu / cuda).

    CPU: ``auto`` is bf16 autocast where ``bf16_flags`` (the CPU's :data:`BF16_FLAGS`) is not empty
    (bf16 matrix kernels in hardware), else float32 (bf16 would be emulated, slower than float32);
    f32 / bf16 force it. CUDA: ``auto`` keeps ``mixed_precision``; f32 / bf16 set it (no / bf16) and
    must not contradict an explicit ``mixed_precision``. LoRA parameters and optimizer state are
    float32 in every case."""
    if device_type == "cuda":
        if precision == "auto":
            name = "f32" if mixed_precision == "no" else mixed_precision
            return PrecisionChoice(name, False, mixed_precision, f"CUDA: mixed_precision={mixed_precision!r}")
        wanted = "no" if precision == "f32" else precision
        if mixed_precision not in ("no", wanted):
            raise InvalidInputError("precision", f"{precision!r} contradicts mixed_precision {mixed_precision!r}; "
                                                 "give one of them")
        return PrecisionChoice(precision, False, wanted, f"CUDA: precision={precision!r} requested")
    if precision == "auto":
        if bf16_flags:
            return PrecisionChoice("bf16", True, "no", f"auto: the CPU has {', '.join(bf16_flags)} "
                                                       "(bf16 matrix kernels in hardware)")
        return PrecisionChoice("f32", False, "no", f"auto: the CPU has none of {', '.join(BF16_FLAGS)} "
                                                   "(bf16 would be emulated, slower than float32)")
    return PrecisionChoice(precision, precision == "bf16", "no", f"precision={precision!r} requested")


class PlateauRule:
    """Early stop: the smoothed loss (mean of the last ``window`` step losses) sets a best, which a later
    value replaces only when it falls below ``best x (1 - min_delta)``; ``patience`` steps without such a
    fall end the run. The state is a function of the loss history alone, so a resumed run rebuilds it
    with :meth:`replay` and stops at the step an uninterrupted run stops at."""

    def __init__(self, patience: int, min_delta: float, window: int) -> None:
        self.patience, self.min_delta, self.window = patience, min_delta, window
        self.recent: list[float] = []
        self.step = 0
        self.best: float | None = None
        self.best_step = 0

    @property
    def rule(self) -> str:
        return (f"stop when the smoothed loss (mean of the last {self.window} steps) has not fallen below its "
                f"best x (1 - {self.min_delta:g}) for {self.patience} steps")

    def update(self, loss: float) -> dict[str, Any] | None:
        """Take one step's loss; the stop record (step, smoothed loss, best, rule) when the run should end."""
        self.step += 1
        self.recent = (self.recent + [float(loss)])[-self.window:]
        if len(self.recent) < self.window:
            return None
        smoothed = sum(self.recent) / self.window
        if self.best is None or smoothed < self.best * (1 - self.min_delta):
            self.best, self.best_step = smoothed, self.step
            return None
        if self.step - self.best_step < self.patience:
            return None
        return {"step": self.step, "smoothed_loss": smoothed, "best_smoothed_loss": self.best,
                "best_step": self.best_step, "patience": self.patience, "min_delta": self.min_delta,
                "window": self.window, "rule": self.rule}

    def replay(self, losses: list[float]) -> dict[str, Any] | None:
        """Feed a run's earlier losses (after a resume); the first stop record met on the way, if any."""
        stops = [stop for stop in map(self.update, losses) if stop is not None]
        return stops[0] if stops else None
