#!/usr/bin/env bash
# Installs ONNX Runtime's C library (shipped inside the PyPI onnxruntime wheel) and Python `onnx`
# (used by the graph checks) into ./.venv, where star-export and star-run find it without
# ORT_DYLIB_PATH. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import onnxruntime, onnx" 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check "onnxruntime==1.31.*" "onnx==1.23.*"
fi
ls .venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* >/dev/null
