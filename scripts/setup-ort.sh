#!/usr/bin/env bash
# Installs ONNX Runtime's C library (shipped inside the PyPI onnxruntime wheel) and Python `onnx`
# (used by the graph checks) into ./.venv, where star-export and star-run find it without
# ORT_DYLIB_PATH; and, pinned, the clients the serve tests drive (the official `openai` SDK,
# `tritonclient[http]`, schemathesis), the deployment checks' validators and Ray Serve
# (deploy/ray). Idempotent.
#
#   --gpu   instead: the GPU build (onnxruntime-gpu, CUDA 13) with the CUDA 13 runtime, cuBLAS,
#           cuDNN 9, cuFFT, cuRAND and NVRTC wheels into ./.venv-gpu (the CPU and GPU wheels
#           cannot share one environment), where the ort-cuda and ort-trt backends find it
#           (or set ORT_GPU_DYLIB_PATH). About 2.5 GB. Needs the registry (PyPI) or a wheel
#           folder: STAR_WHEELS=DIR installs from DIR with no network.
#           TensorRT 10 (for ort-trt) is not installed by this script.
set -euo pipefail
cd "$(dirname "$0")/.."
ORT_VERSION="1.31.*"
if [ "${1:-}" = "--gpu" ]; then
  ORT_GPU_VERSION="1.31.1"
  if [ ! -x .venv-gpu/bin/python ]; then
    python3 -m venv .venv-gpu
  fi
  pip_args=(-q --disable-pip-version-check)
  if [ -n "${STAR_WHEELS:-}" ]; then pip_args+=(--no-index --find-links "$STAR_WHEELS"); fi
  if ! .venv-gpu/bin/python -c "import onnxruntime" 2>/dev/null; then
    # [cuda,cudnn] brings cudart, cuDNN, cuFFT, cuRAND and NVRTC; cuBLAS must be named.
    .venv-gpu/bin/pip install "${pip_args[@]}" "onnxruntime-gpu[cuda,cudnn]==$ORT_GPU_VERSION" "nvidia-cublas"
  fi
  capi=$(ls -d .venv-gpu/lib/python3*/site-packages/onnxruntime/capi)
  lib=$(ls "$capi"/libonnxruntime.so.* | head -n1)
  echo "ONNX Runtime GPU build: $lib"
  for p in cuda tensorrt; do
    if [ -f "$capi/libonnxruntime_providers_$p.so" ]; then echo "  provider: $p ($capi/libonnxruntime_providers_$p.so)"; else echo "  provider: $p MISSING"; fi
  done
  for l in libcudart.so.13 libcublasLt.so.13 libcublas.so.13 libcudnn.so.9 libcufft.so.12 libcurand.so.10 libnvrtc.so.13; do
    f=$(ls .venv-gpu/lib/python3*/site-packages/nvidia/*/lib/$l* 2>/dev/null | head -n1 || true)
    echo "  $l: ${f:-MISSING}"
  done
  if ldconfig -p 2>/dev/null | grep -q 'libnvinfer.so.10'; then echo "  TensorRT 10 (ort-trt): found"; else echo "  TensorRT 10 (ort-trt): not on the library path (ort-cuda does not need it)"; fi
  if ldconfig -p 2>/dev/null | grep -q 'libcuda.so.1'; then echo "  NVIDIA driver: found"; else echo "  NVIDIA driver: libcuda.so.1 not found (no GPU here: the GPU backends will refuse to start)"; fi
  echo "star-run finds it in ./.venv-gpu; elsewhere: export ORT_GPU_DYLIB_PATH=$PWD/$lib"
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import onnxruntime, onnx" 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check "onnxruntime==$ORT_VERSION" "onnx==1.23.*"
fi
# The clients `star-run serve` is tested with (runtime/tests/clients.rs), at the versions tested,
# and the deployment checks' schema validators (deploy/checks/validate_manifests.py: Kubernetes
# schemas bundled, KEDA's CRD models).
if ! .venv/bin/python -c "import openai, tritonclient.http, schemathesis, kubernetes_validate, cloudcoil.models.keda" 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check "openai==3.63.0" "tritonclient[http]==2.73.0" "schemathesis==4.32.5" \
    "kubernetes-validate==1.37.0" "cloudcoil==0.6.0" "cloudcoil-models-keda==2.16.1.0"
fi
# Ray Serve, for the scale-out in deploy/ray and its multi-node tests, pinned with everything it
# resolves to.
if ! .venv/bin/python -c "import ray.serve, aiohttp, starlette, pytest, requests, yaml" 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check -r deploy/ray/requirements.txt -c deploy/ray/constraints.txt
fi
ls .venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* >/dev/null
