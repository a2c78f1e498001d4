"""Base models load from local folders only: HF_HUB_OFFLINE is on once
facetron.diffusion.base_model is imported, every from_pretrained passes
local_files_only, and a path that is not a local diffusers folder (a hub id,
a missing folder) is refused with a clear error before anything loads."""

from __future__ import annotations

import subprocess
import sys

import pytest

from facetron.errors import NotFoundError


def test_offline_is_set_before_the_hub_libraries_load() -> None:
    code = ("import os; os.environ.pop('HF_HUB_OFFLINE', None); import facetron.diffusion.base_model; "
            "import huggingface_hub.constants as c; print(os.environ['HF_HUB_OFFLINE'], c.HF_HUB_OFFLINE)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "True"]


def test_every_from_pretrained_is_local_only() -> None:
    import ast
    import inspect

    from facetron.diffusion import base_model

    calls = [n for n in ast.walk(ast.parse(inspect.getsource(base_model)))
             if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "from_pretrained"]
    assert len(calls) == 5
    assert all(any(k.arg is None or k.arg == "local_files_only" for k in c.keywords) for c in calls)


@pytest.mark.parametrize("path, says", [("runwayml/stable-diffusion-v1-5", "looks like a model-hub id"),
                                        ("/no/such/model", "a local diffusers folder is expected")])
def test_a_non_local_path_is_refused_clearly(path: str, says: str) -> None:
    from facetron.diffusion.base_model import load_base_model

    with pytest.raises(NotFoundError, match=says):
        load_base_model(path)
