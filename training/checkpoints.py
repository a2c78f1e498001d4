"""Training checkpoints: ``step-NNNNNN/`` folders written atomically with the
LoRA parameters, optimizer, LR scheduler and every RNG state, so a killed
run resumes exactly (tests compare a resumed run with a straight one), and
the per-step LoRA snapshots that checkpoint selection by identity scores."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from facetron.atomic import atomic_dir, atomic_write_json
from facetron.errors import InvalidInputError

CHECKPOINT_RE = re.compile(r"^step-(\d{6,})$")
LORA_SUFFIX = ".safetensors"



def checkpoint_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under ``root``, by step."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (p / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def snapshot_files(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, LoRA file) of the identity candidates under ``root``, by step."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.suffix == LORA_SUFFIX and (m := CHECKPOINT_RE.match(p.stem))]
    return sorted(found)


def newest_checkpoint(root: str | os.PathLike) -> Path | None:
    """Newest complete ``step-NNNNNN`` folder under ``root`` (None if there is none)."""
    found = checkpoint_dirs(Path(root))
    return found[-1][1] if found else None


def _trainable_state(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{name}": p.detach().to("cpu", torch.float32).contiguous()
            for prefix, m in modules.items() for name, p in m.named_parameters() if p.requires_grad}


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def save_checkpoint(root: Path, step: int, modules: dict[str, torch.nn.Module], optimizer, lr_scheduler,
                    state: dict, keep: int) -> Path:
    """Write ``root/step-NNNNNN/`` atomically, then drop all but the ``keep`` newest."""
    path = root / f"step-{step:06d}"
    with atomic_dir(path) as tmp:
        save_file(_trainable_state(modules), str(tmp / "lora_params.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        atomic_write_json(tmp / "state.json", dict(state, step=step))
    for _, old in checkpoint_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: Path, modules: dict[str, torch.nn.Module], optimizer, lr_scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG states in place; return ``state.json``."""
    saved = load_file(str(path / "lora_params.safetensors"))
    params = {f"{prefix}.{name}": p for prefix, m in modules.items() for name, p in m.named_parameters()
              if p.requires_grad}
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved))[:3], sorted(set(saved) - set(params))[:3]
        raise InvalidInputError(f"checkpoint {path}",
                                f"LoRA parameters do not match (missing {missing}, extra {extra})")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name].to(p.device, p.dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    lr_scheduler.load_state_dict(torch.load(path / "lr_scheduler.pt", map_location="cpu", weights_only=True))
    _set_rng_state(torch.load(path / "rng.pt", map_location="cpu", weights_only=True))
    return json.loads((path / "state.json").read_text())
