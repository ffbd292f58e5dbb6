#!/usr/bin/env bash
# Prepares, on a machine with the registries, what scripts/gpu-check.sh needs on a GPU machine
# that has no network, no Rust and no onnxruntime-gpu (it has python3 with PyTorch and the CUDA 13
# libraries as nvidia-* wheels):
#   bin/       star-run, star-export, gen-random-star (release, stripped; --tensorrt: with the
#              tensorrt feature, which needs libclang-dev)
#   anchors/   the official implementation and its benchmark (../shared/anchors)
#   fixtures/  the golden fixtures (tests/fixtures)
#   ort/       ONNX Runtime's C libraries from the onnxruntime-gpu 1.31.1 wheel (CUDA 13):
#              libonnxruntime.so.1.31.1, libonnxruntime_providers_shared.so and
#              libonnxruntime_providers_cuda.so. They need no particular Python, unlike the wheel.
# packed as one xz-compressed tar stream (scripts/gpu_bundle.py: Python's lzma and tarfile, so
# the GPU machine needs neither xz nor tar) cut into pieces of 60 MiB (the tool carries 64 MiB
# a call, working tree included: 60 leaves room for a tree of up to 4 MiB), each with its
# sha256 in SHA256SUMS, in OUT/pieces (default OUT: .gpu-bundle, which git ignores and the
# device tool can carry; the plan names .gpu-bundle/pieces, where gpu-check.sh looks). It
# prints the plan: which piece each device call carries, in which order, and the command each
# call runs (also in OUT/pieces/plan.json).
#
# Usage: scripts/gpu-bundle.sh [OUT] [--tensorrt] [--profile release|debug] [--ort-libs DIR]
#                              [--xz-preset N] [--piece-mib N]
#   --ort-libs DIR   take the libraries from DIR instead of the wheel (scripts/gpu-rehearsal.sh
#                    passes stand-ins); the wheel is downloaded once into OUT/cache.
#   --profile debug  the binaries cargo test already built (the rehearsal; not for a GPU run).
#   --anchors DIR    the official implementation (default ../shared/anchors).
set -euo pipefail
cd "$(dirname "$0")/.."
out=.gpu-bundle; features=(); profile=release; ort_libs=""; preset=6; piece_mib=60
anchors=../shared/anchors
while [ $# -gt 0 ]; do
  case "$1" in
    --tensorrt) features=(--features tensorrt) ;;
    --profile) profile="$2"; shift ;;
    --ort-libs) ort_libs="$2"; shift ;;
    --xz-preset) preset="$2"; shift ;;
    --piece-mib) piece_mib="$2"; shift ;;
    --anchors) anchors="$2"; shift ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    -*) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) out="$1" ;;
  esac
  shift
done
ORT_GPU_VERSION=1.31.1
ORT_LIBS=(libonnxruntime.so.$ORT_GPU_VERSION libonnxruntime_providers_shared.so libonnxruntime_providers_cuda.so)
if [ ! -f "$anchors/bench_official.py" ]; then
  echo "error: $anchors/bench_official.py not found: the bundle carries the official implementation to measure against (../shared/anchors beside the checkout, or --anchors DIR)" >&2
  exit 2
fi
stage="$out/stage"
rm -rf "$stage"
mkdir -p "$stage/bin" "$stage/ort" "$out/cache"

echo "[bundle] binaries ($profile)" >&2
if [ "$profile" = release ]; then
  cargo build --release -q -p star-runtime -p star-export "${features[@]}"
  cargo build --release -q -p star-benches --bin gen-random-star
else
  cargo build -q -p star-runtime -p star-export -p star-benches "${features[@]}"
fi
for b in star-run star-export gen-random-star; do cp "target/$profile/$b" "$stage/bin/"; done
strip "$stage"/bin/* 2>/dev/null || true

echo "[bundle] ONNX Runtime $ORT_GPU_VERSION GPU libraries" >&2
if [ -z "$ort_libs" ]; then
  if ! ls "$out"/cache/onnxruntime_gpu-$ORT_GPU_VERSION-*.whl >/dev/null 2>&1; then
    # Any Python tag will do: only the C libraries are taken out of it.
    python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
      --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
      "onnxruntime-gpu==$ORT_GPU_VERSION" -d "$out/cache"
  fi
  whl=$(ls "$out"/cache/onnxruntime_gpu-$ORT_GPU_VERSION-*.whl | head -n1)
  python3 - "$whl" "$stage/ort" "${ORT_LIBS[@]}" <<'EOF'
import os, shutil, sys, zipfile
whl, dest, names = sys.argv[1], sys.argv[2], sys.argv[3:]
with zipfile.ZipFile(whl) as z:
    for n in names:
        with z.open("onnxruntime/capi/" + n) as src, open(os.path.join(dest, n), "wb") as dst:
            shutil.copyfileobj(src, dst)
EOF
  ort_libs="$stage/ort"
fi
for l in "${ORT_LIBS[@]}"; do
  [ -f "$ort_libs/$l" ] || { echo "error: $ort_libs has no $l" >&2; exit 2; }
  [ "$ort_libs" = "$stage/ort" ] || cp "$ort_libs/$l" "$stage/ort/"
done

cp -r tests/fixtures "$stage/fixtures"
cp -r "$anchors" "$stage/anchors"
rm -rf "$stage/anchors/__pycache__"
du -sh "$stage"/* >&2
echo "[bundle] packing (xz preset $preset, pieces of $piece_mib MiB)" >&2
python3 scripts/gpu_bundle.py pack "$stage" "$out/pieces" --piece-mib "$piece_mib" --preset "$preset" \
  --carry-dir .gpu-bundle/pieces
rm -rf "$stage"
