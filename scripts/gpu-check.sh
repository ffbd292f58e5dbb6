#!/usr/bin/env bash
# The GPU check, run on a GPU machine through the device tool from the bundle that
# scripts/gpu-bundle.sh made here (its plan says which piece each call carries). Nothing is
# installed there: the CUDA libraries are PyTorch's nvidia-* wheels, found through python3's
# site-packages; ONNX Runtime's GPU libraries come in the bundle.
#
#   gpu-check.sh receive   checks the pieces carried so far (sha256), unpacks what is complete,
#                          and once the binaries are there starts the CPU-bound d30 random-weight
#                          generation and FP16 export in the background (it outlives the call)
#                          and records the card and the official benchmark's imports.
#   gpu-check.sh run       receive, then the check: preflight (GPU, imports, a tiny ort-cuda run
#                          with --verbose, retried with --allow-cpu-fallback if refused for CPU
#                          placement, naming the nodes), the fixture rows (exports, replays on
#                          ort-cuda at 1e-4 relative, FP16 against FP32), then d30/1024 FP16:
#                          `star-run bench` next to the official implementation on the same card,
#                          and the TensorRT rows (skipped without libnvinfer 11.4+).
#   GPU_CHECK_QUICK=1      stop after the fixture rows.
#   GPU_CHECK_BUDGET_S=N   the time of one call's steps (default 480 s); each step also has its own
#                          cap, and a step is skipped when the budget is spent.
#   gpu-check.sh budget    prints the per-step caps and their sum.
#
# Every row is appended to .gpu-bundle/work/table.md as soon as it is known, and copied to
# $OUT/table.md (what the device tool brings back, also from a call stopped at its limit).
# Without a GPU (scripts/gpu-rehearsal.sh) every GPU row says "no GPU".
set -uo pipefail
cd "$(dirname "$0")/.."
G="${GPU_BUNDLE:-.gpu-bundle}"
P="$G/pieces"; B="$G/unpacked"; W="$G/work"
OUTD="${OUT:-$W/out}"
mkdir -p "$W" "$OUTD"
TABLE="$W/table.md"
RUN="$PWD/$B/bin/star-run"; EXP="$PWD/$B/bin/star-export"; GEN="$PWD/$B/bin/gen-random-star"
F="$PWD/$B/fixtures"; A="$PWD/$B/anchors"

# Per-step caps, NAME:SECONDS:TIMES (the most times a run takes that step): the steps of one
# call add up to under 500 s (`budget` prints them). The d30 job runs beside them, capped apart.
CAPS=(smi:5:2 imports:20:1 export_tiny:15:4 tiny_run:30:2 replay:25:2 compare:25:2 d30_wait:40:1
      bench:80:1 official:80:1 trt_build:25:1 trt_replay:20:1)
cap() { local c r; for c in "${CAPS[@]}"; do r=${c#*:}; [ "${c%%:*}" = "$1" ] && echo "${r%%:*}"; done; }
BUDGET="${GPU_CHECK_BUDGET_S:-480}"
T0=$(date +%s)

row() {
  [ -f "$TABLE" ] || printf '| %-46s | %-10s | %s |\n|%s|%s|%s|\n' "check" "result" "detail" \
    "$(printf -- '-%.0s' {1..48})" "$(printf -- '-%.0s' {1..12})" "--------" > "$TABLE"
  printf '| %-46s | %-10s | %s |\n' "$1" "$2" "$(echo "$3" | tr '\n|' ' /' | cut -c1-400)" >> "$TABLE"
  cp "$TABLE" "$OUTD/table.md" 2>/dev/null
  echo "[gpu-check $(elapsed)] $1: $2 $3" >&2
}
elapsed() { echo "$(( $(date +%s) - T0 ))s"; }
left() { echo $(( BUDGET - $(date +%s) + T0 )); }
# step CAP_NAME CMD...: CMD under min(its cap, what is left of the budget); 124 when skipped.
step() {
  local c; c=$(cap "$1"); shift
  local l; l=$(left)
  [ "$l" -lt "$c" ] && c=$l
  if [ "$c" -le 3 ]; then echo "out of the check's time budget" >&2; return 124; fi
  timeout "$c" "$@"
}
# The verdict of a failed GPU step: "no GPU" when the binary says there is none.
verdict() { grep -qE "no usable NVIDIA GPU|libcuda.so.1 not found" "$1" && echo "no GPU" || echo "FAIL"; }
first_error() { grep -m1 -E "error|FAIL|panicked" "$1" | cut -c1-300; }

environment() {
  local libdirs
  libdirs=$(python3 scripts/gpu_bundle.py ldpath 2>/dev/null)
  export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export ORT_GPU_DYLIB_PATH="$PWD/$B/ort/libonnxruntime.so.1.31.1"
  export ORT_DYLIB_PATH="$ORT_GPU_DYLIB_PATH"
  LIBDIRS="$libdirs"
}

environment_row() {
  local missing="" l d found dirs
  IFS=: read -ra dirs <<< "$LIBDIRS"
  # What ONNX Runtime's CUDA provider links, and cuDNN, which it opens for convolutions.
  for l in libcudart.so.13 libcublasLt.so.13 libcublas.so.13 libcurand.so.10 libcudnn.so.9; do
    found=""
    for d in "${dirs[@]}"; do [ -f "$d/$l" ] && found=1; done
    [ -n "$found" ] || missing="$missing $l"
  done
  if [ -z "$LIBDIRS" ]; then
    row "CUDA libraries (python3's nvidia/*/lib)" "MISSING" "no nvidia/*/lib under $(command -v python3)'s site-packages"
  elif [ -n "$missing" ]; then
    row "CUDA libraries (python3's nvidia/*/lib)" "MISSING" "not found:$missing (in $LIBDIRS)"
  else
    row "CUDA libraries (python3's nvidia/*/lib)" "found" "$LIBDIRS"
  fi
}

gpu_row() {
  local gpu cuda
  gpu=$(timeout "$(cap smi)" nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>/dev/null | head -n1)
  cuda=$(timeout "$(cap smi)" nvidia-smi 2>/dev/null | grep -o "CUDA Version: [0-9.]*" | head -n1)
  if [ -n "$gpu" ]; then
    row "GPU" "found" "$gpu; $cuda"
    echo 1 > "$W/gpu"
  else
    row "GPU" "no GPU" "nvidia-smi $(command -v nvidia-smi >/dev/null && echo failed || echo not found)"
    echo 0 > "$W/gpu"
  fi
}

imports_row() {
  local out="$W/imports.txt"
  if step imports python3 - "$A/star-official" > "$out" 2>&1 <<'EOF'
import sys
sys.path.insert(0, sys.argv[1])
import torch, yaml, huggingface_hub
from timm.models.vision_transformer import Mlp, PatchEmbed, _cfg
from timm.models.layers import DropPath, to_2tuple, trunc_normal_
from timm.models.registry import register_model
from models import build_vae_var
print("torch %s, CUDA available: %s" % (torch.__version__, torch.cuda.is_available()))
EOF
  then row "official benchmark's imports" "ok" "$(tail -n1 "$out")"
  else row "official benchmark's imports" "FAIL" "$(grep -m1 -E "Error|error" "$out" || tail -n1 "$out")"
  fi
}

# The d30/1024 random-weight checkpoint and its FP16 export: CPU work, started as early as the
# binaries are there, in its own session so that it outlives the call that started it.
start_d30() {
  [ -f "$W/d30.status" ] && return 0
  echo "running" > "$W/d30.status"
  setsid nohup bash "$0" d30-job > /dev/null 2>&1 < /dev/null &
  row "d30/1024 checkpoint + fp16 export" "started" "in the background (gen-random-star ${GPU_CHECK_D30:---depth 30 --scales 14 --sampler}, export at ${GPU_CHECK_RES:-1024} px --precision fp16)"
}
d30_job() {
  # GPU_CHECK_D30 / GPU_CHECK_RES shrink the model for a rehearsal on a CPU machine.
  # shellcheck disable=SC2086
  if timeout 360 "$GEN" ${GPU_CHECK_D30:---depth 30 --scales 14 --sampler} --out "$W/d30ckpt" > "$W/gen-d30.txt" 2>&1 \
     && timeout 360 "$EXP" export --transformer "$W/d30ckpt/star.pth" --vae "$W/d30ckpt/vae.pth" \
          --text-encoder "$W/d30ckpt/text" --resolution "${GPU_CHECK_RES:-1024}" --precision fp16 --quiet \
          --out "$W/d30-fp16" > "$W/export-d30.txt" 2>&1; then
    echo "done" > "$W/d30.status"
  else
    echo "failed: $(tail -qn1 "$W/gen-d30.txt" "$W/export-d30.txt" 2>/dev/null | tail -n1)" > "$W/d30.status"
  fi
}

receive() {
  python3 scripts/gpu_bundle.py receive "$P" "$B" || { row "bundle pieces" "FAIL" "see the output above"; return 2; }
  environment
  if [ -x "$GEN" ] && [ -x "$EXP" ] && [ -d "$A" ] && [ ! -f "$W/preflight-early" ]; then
    touch "$W/preflight-early"
    gpu_row
    imports_row
    environment_row
    [ -n "${GPU_CHECK_QUICK:-}" ] || start_d30
  fi
  return 0
}

# A tiny generation on ort-cuda: the first contact of our binaries with the GPU.
tiny_run() {
  local m="$W/tiny-256-fp32" out="$W/tiny-run.txt"
  if step tiny_run "$RUN" --model "$m" --backend ort-cuda --verbose --prompt "a red circle" --seed 1 --out "$W/tiny.png" > "$out" 2>&1; then
    row "tiny ort-cuda run (--verbose)" "PASS" "$(grep -m3 -E "ort-cuda" "$out" | tr '\n' ' ')"
    return
  fi
  if grep -q "would run on the CPU" "$out"; then
    local nodes; nodes=$(grep -m1 -o "would run on the CPU.*" "$out")
    if step tiny_run "$RUN" --model "$m" --backend ort-cuda --verbose --allow-cpu-fallback --prompt "a red circle" --seed 1 --out "$W/tiny.png" > "$W/tiny-run-fallback.txt" 2>&1; then
      row "tiny ort-cuda run" "CPU nodes" "runs with --allow-cpu-fallback; $nodes"
      FALLBACK=--allow-cpu-fallback
    else
      row "tiny ort-cuda run" "FAIL" "$nodes; with --allow-cpu-fallback: $(first_error "$W/tiny-run-fallback.txt")"
    fi
    return
  fi
  row "tiny ort-cuda run (--verbose)" "$(verdict "$out")" "$(first_error "$out")"
}

fixtures() {
  local v name res prec
  for v in tiny-256:256 tiny-1024s:1024; do
    name=${v%%:*}; res=${v#*:}
    for prec in fp32 fp16; do
      [ -f "$W/$name-$prec/manifest.json" ] && continue
      step export_tiny "$EXP" export --transformer "$F/$name/star.pth" --vae "$F/vqvae.pth" --text-encoder "$F/clip_tiny" \
        --resolution "$res" --precision "$prec" --quiet --out "$W/$name-$prec" > /dev/null 2> "$W/export-$name-$prec.err" \
        || row "export $name $prec (CPU)" "FAIL" "$(tail -n1 "$W/export-$name-$prec.err")"
    done
  done
  row "fixture exports (CPU)" "done" "$(ls -d "$W"/tiny-*-fp* 2>/dev/null | wc -l) of 4"
  tiny_run
  printf 'a red circle on a blue background\na green square\n' > "$W/prompts.txt"
  for name in tiny-256 tiny-1024s; do
    local out="$W/replay-$name.txt"
    if step replay "$RUN" replay --backend ort-cuda --verbose ${FALLBACK:-} --model "$W/$name-fp32" --golden "$F/$name" > "$out" 2>&1; then
      row "replay $name fp32, ort-cuda (<= 1e-4 rel)" "PASS" "$(tail -n1 "$out")"
    else
      row "replay $name fp32, ort-cuda (<= 1e-4 rel)" "$(verdict "$out")" "$(first_error "$out")"
    fi
    out="$W/compare-$name.txt"
    if step compare "$RUN" compare --backend ort-cuda ${FALLBACK:-} --reference "$W/$name-fp32" --candidate "$W/$name-fp16" \
        --prompts "$W/prompts.txt" --json "$W/compare-$name.json" > "$out" 2>&1; then
      row "compare $name fp16 vs fp32, ort-cuda" "done" "$(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print('token agreement %.4f, min logit cosine %.6f, PSNR %.1f dB' % (r['token_agreement'], r['min_logit_cosine'], r['psnr_db']))" "$W/compare-$name.json" 2>&1)"
    else
      row "compare $name fp16 vs fp32, ort-cuda" "$(verdict "$out")" "$(first_error "$out")"
    fi
  done
}

# Ours minus text encoding (the official benchmark does not encode text either), in seconds.
bench_seconds() {
  python3 -c "import json,sys; s=json.load(open(sys.argv[1]))['stages']; print('%.3f' % ((s['end_to_end']['median_ms']-s['text_encoder']['median_ms']-s['tokenizer']['median_ms'])/1e3))" "$1"
}

d30_rows() {
  local waited=0 c; c=$(cap d30_wait)
  while [ "$(cat "$W/d30.status" 2>/dev/null)" = running ] && [ "$waited" -lt "$c" ] && [ "$(left)" -gt 5 ]; do
    sleep 1; waited=$((waited + 1))
  done
  local st; st=$(cat "$W/d30.status" 2>/dev/null)
  if [ "$st" != done ]; then
    row "d30/1024 fp16 export" "FAIL" "${st:-not started} (after waiting ${waited}s)"
  else
    local base peak wp ours
    base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -n1)
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$W/mem-ours.txt" 2>/dev/null &
    wp=$!
    if step bench "$RUN" bench --backend ort-cuda --verbose ${FALLBACK:-} --model "$W/d30-fp16" --warmup 1 --runs 3 \
        --json "$W/bench-ours.json" > "$W/bench-ours.txt" 2>&1; then
      kill "$wp" 2>/dev/null
      ours=$(bench_seconds "$W/bench-ours.json")
      peak=$(sort -n "$W/mem-ours.txt" | tail -n1)
      row "star-run bench d30/1024 fp16, ort-cuda" "${ours} s" "median of 3 without text encoding; peak device memory $(( ${peak:-0} - ${base:-0} )) MiB above idle"
      row "host<->device transfers (bench --json)" "$(python3 -c "import json,sys; t=json.load(open(sys.argv[1])).get('transfers'); print('reported' if t else 'n/a')" "$W/bench-ours.json")" \
        "$(python3 -c "import json,sys; t=json.load(open(sys.argv[1])).get('transfers'); print(json.dumps(t)[:300] if t else 'this star-run reports no transfers')" "$W/bench-ours.json")"
      cp "$W/bench-ours.json" "$OUTD/" 2>/dev/null
    else
      kill "$wp" 2>/dev/null
      row "star-run bench d30/1024 fp16, ort-cuda" "$(verdict "$W/bench-ours.txt")" "$(first_error "$W/bench-ours.txt")"
    fi
  fi
  if step official python3 "$A/bench_official.py" --star-src "$A/star-official" --device cuda --depth 30 --res 1024 \
      --sampler --runs 3 > "$W/bench-official.txt" 2>&1; then
    local official; official=$(grep -m1 -o "median [0-9.]* s" "$W/bench-official.txt" | grep -o "[0-9.][0-9.]*")
    row "official PyTorch d30/1024 (fp16 autocast)" "${official} s" "$(grep -m1 median "$W/bench-official.txt")"
    if [ -n "${ours:-}" ] && [ -n "$official" ]; then
      row "ratio official / ours" "$(python3 -c "print('%.2fx' % ($official / $ours))")" "goal: > 1 and ours <= 1.5 s on an H100"
    fi
  else
    row "official PyTorch d30/1024" "$([ "$(cat "$W/gpu")" = 1 ] && echo FAIL || echo "no GPU")" "$(tail -n1 "$W/bench-official.txt" | cut -c1-300)"
  fi
}

tensorrt_rows() {
  local v
  v=$(python3 - <<'EOF' 2>/dev/null
import ctypes
for n in ("libnvinfer.so.11", "libnvinfer.so"):
    try:
        l = ctypes.CDLL(n)
    except OSError:
        continue
    v = l.getInferLibVersion()
    print("%d.%d.%d" % (v // 10000, (v // 100) % 100, v % 100))
    break
EOF
)
  if [ -z "$v" ]; then
    row "tensorrt" "skipped" "no TensorRT on this machine (libnvinfer.so.11 not found)"
    return
  fi
  case "$v" in 11.[4-9].*|11.[1-9][0-9].*) ;; *) row "tensorrt" "skipped" "TensorRT $v: needs 11.4 or a later 11.x"; return ;; esac
  if STAR_TENSORRT_LIB=/nonexistent "$EXP" build-engine --model "$W/tiny-256-fp32" --backend tensorrt --out "$W/trt-probe" 2>&1 | grep -q "no TensorRT support"; then
    row "tensorrt $v" "skipped" "this bundle's star-export was built without --features tensorrt (gpu-bundle.sh --tensorrt)"
    return
  fi
  if step trt_build "$EXP" build-engine --model "$W/tiny-256-fp32" --backend tensorrt --out "$W/trt-tiny" > "$W/trt-build.txt" 2>&1 \
     && step trt_replay "$RUN" replay --engine "$W/trt-tiny" --golden "$F/tiny-256" > "$W/trt-replay.txt" 2>&1; then
    row "tensorrt $v: tiny-256 fp32 engine replay" "PASS" "$(tail -n1 "$W/trt-replay.txt")"
  else
    row "tensorrt $v: tiny-256 fp32 engine replay" "FAIL" "$(cat "$W/trt-build.txt" "$W/trt-replay.txt" 2>/dev/null | grep -m1 error | cut -c1-300)"
  fi
}

run_check() {
  receive || exit 2
  if [ ! -f "$B/.complete" ]; then
    row "bundle" "FAIL" "pieces missing: carry them first (gpu_bundle.py plan $P)"
    exit 2
  fi
  # A machine that was bare at this call: what `receive` does once is done now.
  if [ ! -f "$W/preflight-early" ]; then
    touch "$W/preflight-early"; gpu_row; imports_row; environment_row
    [ -n "${GPU_CHECK_QUICK:-}" ] || start_d30
  fi
  row "ONNX Runtime GPU build" "$([ -f "$B/ort/libonnxruntime_providers_cuda.so" ] && echo found || echo MISSING)" "$ORT_GPU_DYLIB_PATH"
  fixtures
  echo "[gpu-check] quick rows done at $(elapsed)" >&2
  if [ -z "${GPU_CHECK_QUICK:-}" ]; then
    d30_rows
    tensorrt_rows
  else
    row "d30/1024 and tensorrt rows" "skipped" "GPU_CHECK_QUICK is set"
  fi
  echo
  cat "$TABLE"
  echo "(work dir $W, this call $(elapsed))"
}

case "${1:-}" in
  receive) receive ;;
  run) run_check ;;
  d30-job) d30_job ;;
  budget)
    sum=0
    for c in "${CAPS[@]}"; do
      IFS=: read -r n secs times <<< "$c"
      echo "$n ${secs}s x $times"; sum=$((sum + secs * times))
    done
    echo "total ${sum}s (each call's steps also stop at GPU_CHECK_BUDGET_S=$BUDGET)" ;;
  *) sed -n '2,24p' "$0"; exit 2 ;;
esac
