"""Style registry: style name -> prompt template, negative prompt, optional style LoRA and its weight.

The registry owns its folder layout, like the user registry
(:mod:`facetron.users`) beside which it lives::

    <root>/<name>/style.json          # name, prompt, negative, lora_weight, the LoRA's sha256 and source
    <root>/<name>/lora.safetensors    # the style LoRA in facetron's canonical layout (read with numpy)

Root: ``$FACETRON_STYLES_DIR``, else ``styles/`` beside the user registry's
root (``build/styles`` beside ``build/users`` by default, so a server
configured with a ``users_dir`` finds the styles next to it).

The built-in styles (:data:`facetron.diffusion.styles.STYLES`, no LoRA) are
always served; an installed style may not take a built-in name. A style is
installed as one folder built under a temp name and renamed into place
(:func:`facetron.atomic.atomic_dir`): a reader sees all of it or nothing, a
failed ``add`` leaves nothing behind. LoRA files must already be in the
canonical layout (``facetron styles add`` converts them with
``facetron.export.lora_files.convert_lora_file`` and checks them against the
base model); the registry checks that they read with the server's numpy
reader and adapt the UNet only.

The served ``unet`` model reads styles here (no torch), the generation path
reads their prompts; a request naming an unknown style is INVALID_ARGUMENT.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from facetron import contract
from facetron.atomic import atomic_dir, atomic_write_json
from facetron.diffusion.lora_reader import read_lora
from facetron.diffusion.styles import (NEGATIVE, STYLES, Style, check_negative, check_prompt_template, check_style_name,
                                       check_style_weight)
from facetron.errors import InvalidInputError, NotFoundError
from facetron.users import default_root as default_users_root

STYLE_FILE = "style.json"
LORA_FILE = "lora.safetensors"
STYLES_ENV = "FACETRON_STYLES_DIR"


def styles_root(users_root: str | os.PathLike | None = None) -> Path:
    """``$FACETRON_STYLES_DIR``, else ``styles/`` beside the user registry root
    (``users_root``; None or "" = the default user registry)."""
    env = os.environ.get(STYLES_ENV)
    if env:
        return Path(env)
    return Path(users_root or default_users_root()).parent / "styles"


def styles_for(users_root: str | os.PathLike | None = None) -> "StyleRegistry":
    """The style registry that goes with the user registry at ``users_root``."""
    return StyleRegistry(styles_root(users_root))


@dataclass(frozen=True)
class StyleRegistry:
    root: Path

    # --- what the serving side reads ------------------------------------------------

    def style_dir(self, name: str) -> Path:
        return Path(self.root) / check_style_name(name)

    def installed(self) -> list[str]:
        """Names of the installed (not built-in) styles."""
        root = Path(self.root)
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir()
                      if contract.STYLE_NAME_PATTERN.fullmatch(p.name) and (p / STYLE_FILE).is_file())

    def names(self) -> list[str]:
        """Every style a request may name: built-ins, then installed ones."""
        return list(STYLES) + [n for n in self.installed() if n not in STYLES]

    def get(self, name: str) -> Style:
        """The style called ``name`` (built-in or installed); InvalidInputError naming ``style`` otherwise."""
        if name in STYLES:
            return STYLES[name]
        if isinstance(name, str) and contract.STYLE_NAME_PATTERN.fullmatch(name):
            meta = self._meta(name)
            if meta is not None:
                lora = self.style_dir(name) / LORA_FILE if meta.get("lora_sha256") else None
                return Style(name, meta["prompt"], meta.get("negative", NEGATIVE), lora, meta.get("lora_weight"))
        raise InvalidInputError("style", f"unknown style {name!r}; known: {', '.join(self.names())}")

    def version(self, name: str) -> str:
        """An id that changes whenever ``name`` is (re)installed ('' for built-ins): a key for caches."""
        if name in STYLES:
            return ""
        meta = self._meta(check_style_name(name, "style"))
        if meta is None:
            raise InvalidInputError("style", f"unknown style {name!r}; known: {', '.join(self.names())}")
        return str(meta.get("installed", ""))

    def lora(self, name: str, default_weight: float = contract.DEFAULT_STYLE_WEIGHT) -> tuple[Path | None, float]:
        """(the style's LoRA file or None, its weight: the style's own, else ``default_weight``)."""
        style = self.get(name)
        return (style.lora, style.weight(default_weight)) if style.lora is not None else (None, 0.0)

    def _meta(self, name: str) -> dict | None:
        path = Path(self.root) / name / STYLE_FILE
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise InvalidInputError("style", f"style {name!r} in {self.root} is unreadable ({exc}); "
                                             f"reinstall it with `facetron styles add --replace`") from None

    # --- changes ----------------------------------------------------------------------

    def add(self, name: str, prompt: str, negative: str = NEGATIVE, lora_file: str | os.PathLike | None = None,
            weight: float | None = None, *, source: str | None = None, replace: bool = False) -> Style:
        """Install a style, atomically. ``lora_file``: a style LoRA in facetron's
        canonical layout (UNet layers only); ``weight``: its weight (None = the
        server's w_style). Every field is checked before anything is written."""
        # 1. check every field (errors name the option)
        weight = self.check_new(name, prompt, negative, weight, has_lora=lora_file is not None, replace=replace)
        sha = None
        if lora_file is not None:
            sha = _check_style_lora(Path(lora_file))
        # 2. build the style's folder under a temp name, then rename it into place
        meta = {"name": name, "prompt": prompt, "negative": negative, "lora_weight": weight, "lora_sha256": sha,
                "lora_source": source or (str(lora_file) if lora_file is not None else None),
                "installed": uuid.uuid4().hex}
        Path(self.root).mkdir(parents=True, exist_ok=True)
        with atomic_dir(Path(self.root) / name, "name") as tmp:
            if lora_file is not None:
                shutil.copyfile(lora_file, tmp / LORA_FILE)
            atomic_write_json(tmp / STYLE_FILE, meta)
        return self.get(name)

    def check_new(self, name: str, prompt: str, negative: str = NEGATIVE, weight: float | None = None, *,
                  has_lora: bool = False, replace: bool = False) -> float | None:
        """The rules :meth:`add` applies to a new style's fields (callers with
        slow work to do first, like converting a LoRA, check early); returns the weight."""
        check_style_name(name, "name")
        if name in STYLES:
            raise InvalidInputError("name", f"{name!r} is a built-in style; choose another name")
        check_prompt_template(prompt, "--prompt")
        check_negative(negative, "--negative")
        if weight is not None:
            if not has_lora:
                raise InvalidInputError("--weight", "is the style LoRA's weight: give --lora too")
            weight = check_style_weight(weight, "--weight")
        if (Path(self.root) / name).exists() and not replace:
            raise InvalidInputError("name", f"style {name!r} is already installed in {self.root} "
                                            "(remove it first, or add with --replace)")
        return weight

    def remove(self, name: str) -> None:
        """Uninstall a style (its folder is renamed away, then deleted)."""
        check_style_name(name, "name")
        if name in STYLES:
            raise InvalidInputError("name", f"{name!r} is a built-in style and cannot be removed")
        folder = Path(self.root) / name
        if not (folder / STYLE_FILE).is_file():
            raise NotFoundError(f"name: no installed style {name!r} in {self.root}")
        trash = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".removed", dir=self.root))
        os.replace(folder, trash / name)
        shutil.rmtree(trash, ignore_errors=True)

    def describe(self, name: str) -> dict:
        """A JSON-able summary of one style (for ``facetron styles list``)."""
        style = self.get(name)
        meta = {} if name in STYLES else (self._meta(name) or {})
        return {"name": name, "builtin": name in STYLES, "prompt": style.prompt, "negative": style.negative,
                "lora": str(style.lora) if style.lora else None, "lora_weight": style.lora_weight,
                "lora_source": meta.get("lora_source")}


def _check_style_lora(path: Path) -> str:
    """Refuse a LoRA the served ``unet`` could not use as a style; returns its sha256."""
    lora = read_lora(path)  # canonical layout, finite values (NotFoundError / InvalidInputError name the file)
    others = sorted(f"{c}.{m}" for c, m in lora.layers if c != "unet")
    if others:
        raise InvalidInputError("--lora", f"{path} adapts {len(others)} text-encoder layers (e.g. {others[0]}): "
                                          "a style LoRA may adapt the UNet only")
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
