"""Find weights and data files that ship inside installed packages.

The packages are located with ``importlib.util.find_spec`` and never
imported: several of them (face_recognition_models, open_clip,
facenet_pytorch) fail to import here or drag in torchvision. No file is
ever downloaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from facetron.errors import AssetMissingError

# package -> (relative path inside the package, licence note)
_ASSETS: dict[str, tuple[str, str, str]] = {
    "mtcnn_pnet": ("facenet_pytorch", "data/pnet.pt", "MIT (facenet-pytorch)"),
    "mtcnn_rnet": ("facenet_pytorch", "data/rnet.pt", "MIT (facenet-pytorch)"),
    "mtcnn_onet": ("facenet_pytorch", "data/onet.pt", "MIT (facenet-pytorch)"),
    "dlib_resnet": (
        "face_recognition_models",
        "models/dlib_face_recognition_resnet_model_v1.dat",
        "CC0 (dlib / Davis King)",
    ),
    "dlib_shape5": (
        "face_recognition_models",
        "models/shape_predictor_5_face_landmarks.dat",
        "CC0 (dlib / Davis King)",
    ),
    "dlib_shape68": (
        "face_recognition_models",
        "models/shape_predictor_68_face_landmarks.dat",
        "NON-COMMERCIAL (iBUG 300-W training data)",
    ),
    "dlib_mmod": (
        "face_recognition_models",
        "models/mmod_human_face_detector.dat",
        "CC0 (dlib / Davis King)",
    ),
    "clip_bpe": ("open_clip", "bpe_simple_vocab_16e6.txt.gz", "MIT (OpenAI CLIP)"),
    "photo_t1": ("insightface", "data/images/t1.jpg", "sample image shipped by insightface"),
    "photo_tom_hanks": (
        "insightface",
        "data/images/Tom_Hanks_54745.png",
        "sample image shipped by insightface",
    ),
    "photo_astronaut": ("skimage", "data/astronaut.png", "public domain (NASA)"),
}


def package_dir(package: str) -> Path:
    """Directory of an installed top-level package, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissingError(
            f"package {package!r} is not installed (run `make setup`)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def asset_path(name: str) -> Path:
    """Path of a named asset; raises AssetMissingError naming package and file."""
    if name not in _ASSETS:
        raise AssetMissingError(f"unknown asset {name!r}; known: {sorted(_ASSETS)}")
    package, rel, _licence = _ASSETS[name]
    path = package_dir(package) / rel
    if not path.is_file():
        raise AssetMissingError(f"asset {name!r}: {path} is missing from package {package!r}")
    return path


def asset_licence(name: str) -> str:
    """Licence note of a named asset."""
    return _ASSETS[name][2]


def asset_names() -> list[str]:
    return sorted(_ASSETS)
