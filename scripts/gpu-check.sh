#!/usr/bin/env bash
# The GPU check: on a machine with one NVIDIA GPU and no network, using only the files of a
# bundle (made by scripts/gpu-bundle.sh on a machine with the registries), prints one table:
#   - the GPU, driver and CUDA version;
#   - golden fixture replays on ort-cuda (FP32, the FP32 tolerance of every other backend: 1e-4
#     relative) and FP16 against FP32 with `star-run compare` on ort-cuda;
#   - `star-run bench` at d30/1024 with the stable sampler, FP16, on ort-cuda, next to the
#     official implementation on the same card (bench_official.py --device cuda --depth 30
#     --res 1024 --sampler), and their ratio; peak device memory while ours ran;
#   - the same on native TensorRT 11 (build-engine + star-run --engine) when the bundle's
#     star-export was built with --features tensorrt and libnvinfer.so.11 is found; otherwise
#     that row says it was skipped and why.
# Usage: scripts/gpu-check.sh BUNDLE [WORK_DIR]     (WORK_DIR default: a fresh temp dir)
#        GPU_CHECK_QUICK=1 scripts/gpu-check.sh ...  fixture rows only (a first smoke test, ~1 min)
# Budget: under 10 minutes on an H100/H200 (each step has its own timeout).
set -uo pipefail
B="$(cd "${1:?usage: gpu-check.sh BUNDLE [WORK_DIR]}" && pwd)"
W="${2:-$(mktemp -d)}"
mkdir -p "$W"
RUN="$B/bin/star-run"; EXP="$B/bin/star-export"; GEN="$B/bin/gen-random-star"
declare -a ROWS
row() { ROWS+=("$(printf '| %-44s | %-10s | %s |' "$1" "$2" "$3")"); echo "[gpu-check] $1: $2 $3" >&2; }
t0=$(date +%s)
elapsed() { echo "$(( $(date +%s) - t0 ))s"; }

# --- the card -------------------------------------------------------------------------------
gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n1)
cuda=$(nvidia-smi 2>/dev/null | grep -o "CUDA Version: [0-9.]*" | head -n1)
row "GPU" "$([ -n "$gpu" ] && echo found || echo MISSING)" "${gpu:-none (nvidia-smi failed)}; ${cuda:-CUDA ?}"

# --- ONNX Runtime GPU build from the bundle's wheel, CUDA libraries from the bundle or torch --
python3 -m venv --system-site-packages "$W/venv" >/dev/null
# An onnxruntime-gpu already installed on the machine serves as it is (no wheel to carry).
ORT_GPU_DYLIB_PATH=$("$W/venv/bin/python" - <<'EOF' 2>/dev/null
import glob, os, onnxruntime
capi = os.path.join(os.path.dirname(onnxruntime.__file__), "capi")
if os.path.exists(os.path.join(capi, "libonnxruntime_providers_cuda.so")):
    print(sorted(glob.glob(os.path.join(capi, "libonnxruntime.so.*")))[-1])
EOF
)
if [ -z "$ORT_GPU_DYLIB_PATH" ]; then
  for p in "$B"/wheels/*.part-000; do
    [ -e "$p" ] || continue
    cat "${p%.part-000}".part-* > "$W/$(basename "${p%.part-000}")"
  done
  ls "$B"/wheels/*.whl >/dev/null 2>&1 && cp "$B"/wheels/*.whl "$W"/ 2>/dev/null
  "$W/venv/bin/pip" install -q --no-index --no-deps "$W"/onnxruntime_gpu-*.whl >&2 || true
  ORT_GPU_DYLIB_PATH=$(ls "$W"/venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* 2>/dev/null | head -n1)
fi
export ORT_GPU_DYLIB_PATH
# The CUDA 13 libraries the provider links: from nvidia-* wheels already installed (PyTorch's),
# found by soname through LD_LIBRARY_PATH.
libdirs=$("$W/venv/bin/python" - <<'EOF' 2>/dev/null
import glob, os, sys
dirs = set()
for sp in sys.path:
    for f in glob.glob(os.path.join(sp, "nvidia", "*", "lib", "lib*.so*")):
        dirs.add(os.path.dirname(f))
print(":".join(sorted(dirs)))
EOF
)
export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
row "ONNX Runtime GPU build" "$([ -n "$ORT_GPU_DYLIB_PATH" ] && echo found || echo MISSING)" "${ORT_GPU_DYLIB_PATH:-the bundle has no onnxruntime_gpu wheel}; CUDA libraries from: ${libdirs:-none found (the provider will say which is missing)}"

# --- fixture replays -----------------------------------------------------------------------
F="$B/fixtures"
for v in tiny-256:256 tiny-1024s:1024; do
  name=${v%%:*}; res=${v#*:}
  for prec in fp32 fp16; do
    timeout 120 "$EXP" export --transformer "$F/$name/star.pth" --vae "$F/vqvae.pth" --text-encoder "$F/clip_tiny" \
      --resolution "$res" --precision "$prec" --quiet --out "$W/$name-$prec" >/dev/null 2>"$W/export-$name-$prec.err" \
      || row "export $name $prec" "FAIL" "$(tail -n1 "$W/export-$name-$prec.err")"
  done
  if timeout 180 "$RUN" replay --backend ort-cuda --model "$W/$name-fp32" --golden "$F/$name" > "$W/replay-$name.txt" 2>&1; then
    row "replay $name fp32, ort-cuda (<= 1e-4 rel)" "PASS" "$(tail -n1 "$W/replay-$name.txt")"
  else
    row "replay $name fp32, ort-cuda (<= 1e-4 rel)" "FAIL" "$(grep -m1 -E "FAIL|error" "$W/replay-$name.txt" | cut -c1-150)"
  fi
  printf 'a red circle on a blue background\na green square\n' > "$W/prompts.txt"
  if timeout 180 "$RUN" compare --backend ort-cuda --reference "$W/$name-fp32" --candidate "$W/$name-fp16" \
      --prompts "$W/prompts.txt" --json "$W/compare-$name.json" > "$W/compare-$name.txt" 2>&1; then
    row "compare $name fp16 vs fp32, ort-cuda" "done" "$(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print('token agreement %.4f, min logit cosine %.6f, PSNR %.1f dB' % (r['token_agreement'], r['min_logit_cosine'], r['psnr_db']))" "$W/compare-$name.json" 2>/dev/null || tail -n1 "$W/compare-$name.txt")"
  else
    row "compare $name fp16 vs fp32, ort-cuda" "FAIL" "$(tail -n1 "$W/compare-$name.txt" | cut -c1-150)"
  fi
done
echo "[gpu-check] fixtures done at $(elapsed)" >&2

if [ -n "${GPU_CHECK_QUICK:-}" ]; then
  row "d30/1024 benches, tensorrt" "skipped" "GPU_CHECK_QUICK is set"
  printf '| %-44s | %-10s | %s |\n' "check" "result" "detail"
  printf '%s\n' "${ROWS[@]}"
  exit 0
fi
# --- d30/1024 with the sampler, FP16 -----------------------------------------------------------
timeout 300 "$GEN" --depth 30 --scales 14 --sampler --out "$W/d30ckpt" >/dev/null 2>"$W/gen.err" || row "gen-random-star d30" "FAIL" "$(tail -n1 "$W/gen.err")"
timeout 300 "$EXP" export --transformer "$W/d30ckpt/star.pth" --vae "$W/d30ckpt/vae.pth" --text-encoder "$W/d30ckpt/text" \
  --resolution 1024 --precision fp16 --quiet --out "$W/d30-fp16" >/dev/null 2>"$W/export-d30.err" || row "export d30 fp16" "FAIL" "$(tail -n1 "$W/export-d30.err")"
echo "[gpu-check] d30 export done at $(elapsed)" >&2
mem_watch() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$1" 2>/dev/null & echo $!; }
base_mem=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -n1)
wp=$(mem_watch "$W/mem-ours.txt")
if timeout 240 "$RUN" bench --backend ort-cuda --verbose --model "$W/d30-fp16" --warmup 2 --runs 5 --json "$W/bench-ours.json" > "$W/bench-ours.txt" 2>&1; then
  ours=$(python3 -c "import json,sys; s=json.load(open(sys.argv[1]))['stages']; print('%.3f' % ((s['end_to_end']['median_ms']-s['text_encoder']['median_ms']-s['tokenizer']['median_ms'])/1e3))" "$W/bench-ours.json")
  kill "$wp" 2>/dev/null
  peak=$(sort -n "$W/mem-ours.txt" | tail -n1)
  row "star-run bench d30/1024 fp16, ort-cuda" "${ours} s" "median of 5 without text encoding; peak device memory $((peak - base_mem)) MiB above idle"
else
  kill "$wp" 2>/dev/null
  row "star-run bench d30/1024 fp16, ort-cuda" "FAIL" "$(grep -m1 error "$W/bench-ours.txt" | cut -c1-150)"
fi
if timeout 300 python3 "$B/anchors/bench_official.py" --star-src "$B/anchors/star-official" --device cuda --depth 30 --res 1024 --sampler --runs 3 > "$W/bench-official.txt" 2>&1; then
  official=$(grep -m1 -o "median [0-9.]* s" "$W/bench-official.txt" | grep -o "[0-9.][0-9.]*")
  row "official PyTorch d30/1024 (fp16 autocast)" "${official} s" "$(grep -m1 median "$W/bench-official.txt" | cut -c1-120)"
  if [ -n "${ours:-}" ] && [ -n "$official" ]; then
    row "ratio official / ours" "$(python3 -c "print('%.2fx' % ($official / $ours))")" "goal: > 1 and ours <= 1.5 s on an H100/H200"
  fi
else
  row "official PyTorch d30/1024" "FAIL" "$(tail -n1 "$W/bench-official.txt" | cut -c1-150)"
fi
echo "[gpu-check] benches done at $(elapsed)" >&2

# --- native TensorRT 11 --------------------------------------------------------------------------
trt_lib="${STAR_TENSORRT_LIB:-$(ls "$B"/tensorrt/lib/libnvinfer.so.11* 2>/dev/null | head -n1)}"
# A build without the feature says so in one line (nothing is written for a missing library).
probe=$(STAR_TENSORRT_LIB=/nonexistent "$EXP" build-engine --model "$W/tiny-256-fp32" --backend tensorrt --out "$W/trt-probe" 2>&1 || true)
if echo "$probe" | grep -q "no TensorRT support"; then
  row "tensorrt d30/1024 fp16" "skipped" "this star-export was built without --features tensorrt"
elif [ -z "$trt_lib" ] && ! ldconfig -p 2>/dev/null | grep -q libnvinfer.so.11; then
  row "tensorrt d30/1024 fp16" "skipped" "TensorRT 11 not found (bundle tensorrt/lib or STAR_TENSORRT_LIB)"
else
  export STAR_TENSORRT_LIB="${trt_lib:-libnvinfer.so.11}"
  export LD_LIBRARY_PATH="$(dirname "$STAR_TENSORRT_LIB"):$LD_LIBRARY_PATH"
  if timeout 400 "$EXP" build-engine --model "$W/d30-fp16" --backend tensorrt --out "$W/d30-trt" > "$W/trt-build.txt" 2>&1 \
     && timeout 200 "$RUN" bench --engine "$W/d30-trt" --warmup 2 --runs 5 --json "$W/bench-trt.json" > "$W/bench-trt.txt" 2>&1; then
    trt=$(python3 -c "import json,sys; s=json.load(open(sys.argv[1]))['stages']; print('%.3f' % ((s['end_to_end']['median_ms']-s['text_encoder']['median_ms']-s['tokenizer']['median_ms'])/1e3))" "$W/bench-trt.json")
    row "star-run --engine d30/1024 fp16, tensorrt" "${trt} s" "goal <= 1.0 s on an H100"
  else
    row "star-run --engine d30/1024 fp16, tensorrt" "FAIL" "$(grep -h -m1 error "$W/trt-build.txt" "$W/bench-trt.txt" 2>/dev/null | head -n1 | cut -c1-150)"
  fi
fi

echo
printf '| %-44s | %-10s | %s |\n' "check" "result" "detail"
printf '|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..46})" "$(printf -- '-%.0s' {1..12})" "--------"
printf '%s\n' "${ROWS[@]}"
echo "(work dir $W, $(elapsed))"
