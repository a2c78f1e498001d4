"""Helpers of the web app's tests: write logins, start ``facetron web`` on a
free port and wait for it, register a ready-to-generate user (random LoRA) quickly."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from facetron.triton.server import free_port
from user_tokens import grant  # noqa: E402


def write_logins(path: Path, logins: dict[str, str]) -> Path:
    """A credentials file with these (user, password) logins, written by the app's own --add-login code."""
    from facetron.web.auth import set_login

    for user, password in logins.items():
        set_login(path, user, password)
    return path


def start_web(server: str, users_dir: Path, work: Path, log: Path, *extra: str,
              credentials: Path | None = None) -> tuple[subprocess.Popen, str]:
    """``facetron web --server SERVER`` on a free loopback port, behind the logins in ``credentials``
    (None: --no-login); returns (process, base url)."""
    port = free_port()
    login = ["--credentials", str(credentials)] if credentials is not None else ["--no-login"]
    cmd = [sys.executable, "-m", "facetron.cli", "web", "--server", server, "--port", str(port),
           "--users-dir", str(users_dir), "--work", str(work), *login, *extra]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"facetron web exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:  # the page, or its login page
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"facetron web did not answer within 90 s:\n{log.read_text()[-3000:]}")


def stop_web(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def register_ready_user(users_dir: Path, user: str, work: Path) -> None:
    """A user the server can generate for at once: reference embedding and template
    face from the shipped demo photos, a random (non-zero) LoRA on the tiny model."""
    from facetron.diffusion.base_model import load_base_model
    from facetron.faces.attributes import UserAttributes
    from facetron.training.demo_photos import make_demo_photos
    from facetron.training.preprocess import PrepareConfig, prepare_photos
    from facetron.training.random_lora import write_random_lora
    from facetron.users import UserRegistry

    prepared = prepare_photos(make_demo_photos(work / "photos"), work / "prep", PrepareConfig(resolution=128),
                              UserAttributes({"gender": "woman"}), progress=False)
    registry = UserRegistry(users_dir)
    registry.save_reference_embedding(user, prepared.reference_embedding)
    grant(registry, user)
    registry.update(user, {name: work / "prep" / name for name in ("template.png", "template.json")})
    lora = write_random_lora(work / f"{user}.safetensors", load_base_model().unet, rank=4, alpha=4, seed=3, std=0.3)
    registry.install_lora(user, lora)
