#!/usr/bin/env bash
# Prepares, on a machine with the registries, the bundle that scripts/gpu-check.sh runs from on a
# GPU machine without network or Rust:
#   OUT/bin/      release star-run, star-export, gen-random-star (built here; --tensorrt builds
#                 them with the tensorrt feature, which needs libclang-dev)
#   OUT/wheels/   the onnxruntime-gpu wheel (CUDA 13), cut into 60 MiB pieces (*.part-NNN) so
#                 that each fits one call of a 64 MiB transfer; gpu-check.sh joins them (and
#                 skips them when the GPU machine already has onnxruntime-gpu installed)
# Carrying it with the device tool (64 MiB per call, working tree included: move tests/fixtures
# and assets/ out of the tree for the calls): call 1 bin/ + anchors/ + fixtures/ (about 60 MB),
# then one wheel piece per call while the machine is warm, then gpu-check.sh.
#   OUT/fixtures/ the golden fixtures (tests/fixtures)
#   OUT/anchors/  the official implementation and its benchmark (../shared/anchors)
# The CUDA 13 libraries are not bundled: gpu-check.sh uses the nvidia-* wheels installed beside
# PyTorch on the GPU machine (or add their wheels to OUT/wheels and install them there).
# Usage: scripts/gpu-bundle.sh OUT [--tensorrt]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: gpu-bundle.sh OUT [--tensorrt]}"
features=()
if [ "${2:-}" = "--tensorrt" ]; then features=(--features tensorrt); fi
mkdir -p "$out/bin" "$out/wheels"
cargo build --release -p star-runtime -p star-export "${features[@]}"
cargo build --release -p star-benches --bin gen-random-star
cp target/release/star-run target/release/star-export target/release/gen-random-star "$out/bin/"
strip "$out"/bin/* 2>/dev/null || true
if ! ls "$out"/wheels/onnxruntime_gpu-*.part-000 >/dev/null 2>&1; then
  python3 -m pip download -q --disable-pip-version-check --no-deps "onnxruntime-gpu==1.31.1" -d "$out/wheels"
  for w in "$out"/wheels/onnxruntime_gpu-*.whl; do
    split -b 60m -d -a 3 "$w" "$w.part-" && rm "$w"
  done
fi
rm -rf "$out/fixtures" "$out/anchors"
cp -r tests/fixtures "$out/fixtures"
cp -r ../shared/anchors "$out/anchors"
du -sh "$out"/*
