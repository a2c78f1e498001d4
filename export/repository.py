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
from pathlib import Path
from typing import Callable, Iterable

from facetron.atomic import atomic_dir
from facetron.errors import InvalidInputError
from facetron.export.model_configs import TARGETS, ModelDef, Target, models_for, render
from facetron.paths import REPO_ROOT

SOURCE_REPOSITORY = REPO_ROOT / "model_repository"


def _copy_from(path_fn: Callable[[], Path]) -> Callable[[Path], None]:
    return lambda dest: shutil.copyfile(path_fn(), dest)


def _mtcnn(name: str) -> Callable[[Path], None]:
    def build(dest: Path) -> None:
        from facetron.faces.detector import mtcnn_onnx_paths

        shutil.copyfile(mtcnn_onnx_paths()[name], dest)

    return build


def _embedder(dest: Path) -> None:
    from facetron.faces.embedder import embedder_onnx_path

    shutil.copyfile(embedder_onnx_path(), dest)


ARTIFACT_BUILDERS: dict[str, Callable[[Path], None]] = {
    "face_embedder": _embedder,
    "mtcnn_pnet": _mtcnn("pnet"),
    "mtcnn_rnet": _mtcnn("rnet"),
    "mtcnn_onet": _mtcnn("onet"),
}


def _write_model(model: ModelDef, target: Target, dest: Path) -> None:
    serving = model.serving(target)
    version = dest / model.name / "1"
    version.mkdir(parents=True)
    (dest / model.name / "config.pbtxt").write_text(render(model, target))
    if serving.backend == "python":
        src = SOURCE_REPOSITORY / model.name / "1" / "model.py"
        if not src.is_file():
            raise InvalidInputError(model.name, f"python model source {src} is missing")
        shutil.copyfile(src, version / "model.py")
    if serving.artifact:
        ARTIFACT_BUILDERS[model.name](version / serving.artifact)


def assemble_repository(target: Target, out: str | Path, models: Iterable[str] | None = None) -> Path:
    """Write the repository for ``target`` into ``out`` (replacing it atomically)."""
    if target not in TARGETS:
        raise InvalidInputError("--target", f"expected one of {', '.join(TARGETS)}, got {target!r}")
    chosen = models_for(target)
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
        for model in chosen:
            _write_model(model, target, tmp)
    return out


def write_source_configs(root: Path = SOURCE_REPOSITORY) -> list[Path]:
    """Regenerate the checked-in cpu configs (run after editing model_configs)."""
    written = []
    for model in models_for("cpu"):
        path = root / model.name / "config.pbtxt"
        path.write_text(render(model, "cpu"))
        written.append(path)
    return written
