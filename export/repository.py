"""Assemble a servable Triton model repository for a target (cpu | gpu).

Configs come from :mod:`facetron.export.model_configs` (one source of truth);
python models' code comes from the checked-in ``model_repository/`` (whose
``config.pbtxt`` files are the cpu rendering of the same source — a test
keeps them equal); net artifacts (ONNX) are exported into the version
folders for targets that serve nets natively. The repository is built in a
temp folder and renamed into place: an interrupted build leaves no
half-written repository.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from facetron.atomic import atomic_dir, atomic_write_json
from facetron.contract import IDENTITY_MODES
from facetron.diffusion.base_model import load_base_model, model_hash
from facetron.errors import InvalidInputError, NotFoundError
from facetron.export.merge import merge_loras
from facetron.export.model_configs import ModelDef, Target, TARGETS, merged_unet_def, models_for, render
from facetron.export.onnx_export import ModelDims, export_model, export_onnx
from facetron.faces.detector import mtcnn_onnx_paths
from facetron.faces.embedder import embedder_onnx_path
from facetron.paths import REPO_ROOT
from facetron.users import UserRegistry

SOURCE_REPOSITORY = REPO_ROOT / "model_repository"


def _copy_from(path_fn: Callable[[], Path]) -> Callable[[Path], None]:
    return lambda dest: shutil.copyfile(path_fn(), dest)


def _mtcnn(name: str) -> Callable[[Path], None]:
    def build(dest: Path) -> None:
        shutil.copyfile(mtcnn_onnx_paths()[name], dest)

    return build


def _embedder(dest: Path) -> None:
    shutil.copyfile(embedder_onnx_path(), dest)


ARTIFACT_BUILDERS: dict[str, Callable[[Path], None]] = {
    "face_embedder": _embedder,
    "mtcnn_pnet": _mtcnn("pnet"),
    "mtcnn_rnet": _mtcnn("rnet"),
    "mtcnn_onet": _mtcnn("onet"),
}


@dataclass
class DiffusionSource:
    """Where the diffusion models come from: a base model folder (None = the
    tiny embedded default) exported to ONNX during assembly."""

    base_model: Path | None = None
    lora_rank: int = 16  # runtime-LoRA rank (face + style LoRA ranks must fit)
    _exported: Path | None = None
    _info: dict | None = None
    _scheduler: dict | None = None

    def export(self, work: Path) -> None:
        """Export the nets once into ``work`` (text encoder, VAE, runtime-LoRA UNet)."""

        base = load_base_model(self.base_model)
        export_onnx(base, work, models=("text_encoder", "vae_decoder", "vae_encoder"), runtime_lora_rank=self.lora_rank)
        self._exported = work
        self._scheduler = dict(base.scheduler.config)
        self._info = {
            "name": base.path.name,
            "path": str(base.path),
            "hash": model_hash(base.path),
            "is_smoke_model": base.is_smoke_model,
            "resolution": base.resolution,
            "latent_channels": int(base.vae.config.latent_channels),
            "latent_factor": base.latent_factor,
            "text_hidden": int(base.text_encoder.config.hidden_size),
            "lora_rank": self.lora_rank,
        }

    def copy_net(self, name: str, version: Path) -> None:
        src = self._exported / ("unet_lora" if name == "unet" else name)
        for f in src.iterdir():
            if f.suffix in (".onnx", ".data", ".json"):
                shutil.copyfile(f, version / f.name)

    def write_generator_files(self, version: Path) -> None:
        atomic_write_json(version / "model_info.json", self._info)
        atomic_write_json(version / "scheduler_config.json", self._scheduler)


_NET_ARTIFACTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")


def _write_model(
    model: ModelDef, target: Target, dest: Path, diffusion: DiffusionSource | None = None,
    overrides: dict[str, str] | None = None,
) -> None:
    serving = model.serving(target)
    version = dest / model.name / "1"
    version.mkdir(parents=True)
    (dest / model.name / "config.pbtxt").write_text(render(model, target, overrides))
    if serving.backend == "python":
        src = SOURCE_REPOSITORY / (model.source or model.name) / "1" / "model.py"
        if not src.is_file():
            raise InvalidInputError(model.name, f"python model source {src} is missing")
        shutil.copyfile(src, version / "model.py")
    if model.name in _NET_ARTIFACTS and diffusion is not None:
        diffusion.copy_net(model.name, version)
    elif serving.artifact:
        ARTIFACT_BUILDERS[model.name](version / serving.artifact)
    if model.name == "portrait_generator" and diffusion is not None:
        diffusion.write_generator_files(version)


def assemble_repository(
    target: Target,
    out: str | Path,
    models: Iterable[str] | None = None,
    diffusion: DiffusionSource | None = None,
    users_dir: str | Path | None = None,
    identity_mode: str = "runtime_lora",
) -> Path:
    """Write the repository for ``target`` into ``out`` (replacing it atomically).

    Without ``diffusion`` only the face stack + tokenizer are written; with it
    the diffusion models and the portrait models too (cpu target: exported
    from ``diffusion.base_model`` into the version folders)."""
    if target not in TARGETS:
        raise InvalidInputError("--target", f"expected one of {', '.join(TARGETS)}, got {target!r}")
    if identity_mode not in IDENTITY_MODES:
        raise InvalidInputError("--identity-mode", f"expected one of {', '.join(IDENTITY_MODES)}, got {identity_mode!r}")
    overrides = {"identity_mode": identity_mode}
    if users_dir:
        overrides["users_dir"] = str(Path(users_dir).resolve())
    chosen = models_for(target, diffusion=diffusion is not None)
    if models is not None:
        wanted = set(models)
        unknown = wanted - {m.name for m in chosen}
        if unknown:
            raise InvalidInputError("--models", f"not served on target {target}: {sorted(unknown)}")
        chosen = [m for m in chosen if m.name in wanted]
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidInputError(str(out), f"cannot create the output folder ({exc.strerror})") from None
    with atomic_dir(out) as tmp:
        if diffusion is not None:
            diffusion.export(tmp / ".export")
        for model in chosen:
            _write_model(model, target, tmp, diffusion, overrides)
        shutil.rmtree(tmp / ".export", ignore_errors=True)
    return out


def write_source_configs(root: Path = SOURCE_REPOSITORY) -> list[Path]:
    """Regenerate the checked-in cpu configs (run after editing model_configs)."""
    written = []
    for model in models_for("cpu", diffusion=True):
        path = root / model.name / "config.pbtxt"
        path.write_text(render(model, "cpu"))
        written.append(path)
    return written


def add_merged_user(
    repo: str | Path,
    user_id: str,
    users_dir: str | Path,
    base_model: str | Path | None = None,
    style_lora: str | Path | None = None,
    w_face: float = 0.9,
    w_style: float = 0.25,
    target: Target = "cpu",
) -> Path:
    """Serving mode 1: write ``unet_user_<id>`` (the user's LoRA fused into the
    UNet, exported to ONNX) into an assembled repository, atomically, without
    touching the other models. A server in explicit model-control mode loads
    it on the user's first request."""
    import tempfile


    repo = Path(repo)
    if not (repo / "portrait_generator" / "config.pbtxt").is_file():
        raise InvalidInputError(str(repo), "is not an assembled facetron repository with the diffusion models")
    registry = UserRegistry(Path(users_dir))
    try:
        lora = registry.lora_path(user_id)
    except NotFoundError:
        raise NotFoundError(f"--user: no trained LoRA for user {user_id!r} in {registry.root}") from None
    base = load_base_model(base_model)
    unet, _ = merge_loras(base, lora, style_lora, w_face=w_face, w_style=w_style)
    model = merged_unet_def(user_id)
    with tempfile.TemporaryDirectory() as work, atomic_dir(repo / model.name) as tmp:
        export_model("unet", work, unet=unet, dims=ModelDims.of(base))
        version = tmp / "1"
        version.mkdir()
        for f in (Path(work) / "unet").iterdir():
            if f.suffix in (".onnx", ".data", ".json"):
                shutil.copyfile(f, version / f.name)
        shutil.copyfile(SOURCE_REPOSITORY / (model.source or model.name) / "1" / "model.py", version / "model.py")
        (tmp / "config.pbtxt").write_text(render(model, target))
    return repo / model.name
