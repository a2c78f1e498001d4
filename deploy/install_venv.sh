#!/usr/bin/env bash
# Build facetron's pinned venv inside an image (deploy/Dockerfile, both targets):
#   install_venv.sh PYTHON TARGET   (TARGET = cpu | gpu: its one ONNX Runtime package)
# The same order as scripts/setup.sh: torch first, then the pins (+ one ORT
# file), then the data packages without deps, then facetron. No test tools.
set -euo pipefail
PYTHON="$1"; TARGET="$2"
cd /opt/facetron
"$PYTHON" -m venv /opt/facetron/venv
PIP=(/opt/facetron/venv/bin/pip install --no-cache-dir --disable-pip-version-check)
"${PIP[@]}" -r requirements/torch.txt
"${PIP[@]}" -r requirements/base.txt -r "requirements/onnxruntime-$TARGET.txt" -c requirements/torch.txt
"${PIP[@]}" --no-deps -r requirements/nodeps.txt
"${PIP[@]}" --no-deps .
/opt/facetron/venv/bin/python -c "import facetron, onnxruntime, tritonclient.grpc; print('facetron venv ok:', onnxruntime.get_device())"
