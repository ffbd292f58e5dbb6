#!/usr/bin/env bash
# The GPU check, run on a GPU machine through the device tool from the bundle that
# scripts/gpu-bundle.sh made here (its plan says which piece each call carries). Nothing is
# installed there: the CUDA libraries are PyTorch's nvidia-* wheels, found through python3's
# site-packages; ONNX Runtime's GPU libraries come in the bundle.
#
#   gpu-check.sh receive   checks the pieces carried so far (sha256), unpacks what is complete,
#                          and once the binaries are there records the card, the official
#                          benchmark's imports and the CUDA library path, and starts the
#                          CPU-bound d30 random-weight generation and FP16 export in the
#                          background (in its own session: it outlives the call).
#   gpu-check.sh run       receive, then the check: a tiny ort-cuda run with --verbose, the
#                          fixture rows (exports, replays on ort-cuda at 1e-4 relative, FP16
#                          against FP32), then d30/1024 FP16: `star-run bench` next to the
#                          official implementation on the same card, and the TensorRT rows
#                          (skipped without libnvinfer 11.4+). A GPU step refused for CPU
#                          placement is retried once with --allow-cpu-fallback, and its row
#                          names the nodes.
#   GPU_CHECK_QUICK=1      stop after the fixture rows (and start no d30 job).
#   GPU_CHECK_BUDGET_S=N   the time of one call's steps (default 470 s); each step also has its
#                          own cap, and a step the budget cannot hold is skipped and says so.
#   gpu-check.sh budget    prints the per-step caps and their sum.
#
# Every row is appended to .gpu-bundle/work/table.md as soon as it is known, and copied to
# $OUT/table.md with the steps' logs in $OUT/logs.txt (what the device tool brings back, also
# from a call stopped at its limit). Without a GPU (scripts/gpu-rehearsal.sh) every GPU row says
# "no GPU".
set -uo pipefail
cd "$(dirname "$0")/.."
G="${GPU_BUNDLE:-.gpu-bundle}"
case "$G" in /*) ;; *) G="$PWD/$G" ;; esac
P="$G/pieces"; B="$G/unpacked"; W="$G/work"
OUTD="${OUT:-$W/out}"
mkdir -p "$W" "$OUTD"
TABLE="$W/table.md"
RUN="$B/bin/star-run"; EXP="$B/bin/star-export"; GEN="$B/bin/gen-random-star"
F="$B/fixtures"; A="$B/anchors"

# Per-step caps, NAME:SECONDS:TIMES (the most times a run takes that step, a retry with
# --allow-cpu-fallback included): the steps of one call add up to under 500 s (`budget` prints
# them). The d30 job runs beside them, capped apart.
CAPS=(smi:5:2 imports:20:1 export_tiny:15:4 tiny_run:30:2 graphs:15:1 replay:25:2 compare:20:2 d30_wait:35:1
      bench:80:1 official:80:1 trt_build:25:1 trt_replay:20:1)
cap() { local c r; for c in "${CAPS[@]}"; do r=${c#*:}; [ "${c%%:*}" = "$1" ] && echo "${r%%:*}"; done; }
BUDGET="${GPU_CHECK_BUDGET_S:-470}"
T0=$(date +%s)

row() {
  [ -f "$TABLE" ] || printf '| %-46s | %-10s | %s |\n|%s|%s|%s|\n' "check" "result" "detail" \
    "$(printf -- '-%.0s' {1..48})" "$(printf -- '-%.0s' {1..12})" "--------" > "$TABLE"
  printf '| %-46s | %-10s | %s |\n' "$1" "$2" "$(echo "$3" | tr '\n|' ' /' | cut -c1-600)" >> "$TABLE"
  cp "$TABLE" "$OUTD/table.md" 2>/dev/null
  # The steps' own output, for what a row cannot hold (the device tool returns 8 files at most).
  for f in "$W"/*.txt; do [ -f "$f" ] && { echo "==> $(basename "$f")"; tail -c 20000 "$f"; }; done > "$OUTD/logs.txt" 2>/dev/null
  echo "[gpu-check $(elapsed)] $1: $2 $3" >&2
}
elapsed() { echo "$(( $(date +%s) - T0 ))s"; }
left() { echo $(( BUDGET - $(date +%s) + T0 )); }
# step CAP_NAME CMD...: CMD under min(its cap, what is left of the budget). Sets STEP_CAP and
# STEP_SKIPPED (1 when the budget could not hold the step, which then returns 124).
step() {
  local c; c=$(cap "$1"); shift
  local l; l=$(left)
  [ "$l" -lt "$c" ] && c=$l
  STEP_CAP=$c; STEP_SKIPPED=0
  if [ "$c" -le 3 ]; then STEP_SKIPPED=1; return 124; fi
  timeout -k 5 "$c" "$@"
}
first_error() { grep -m1 -E "error|FAIL|panicked|Error" "$1" | cut -c1-300; }
# The row of a failed step: skipped (budget), TIMEOUT (its cap), "no GPU" when the binary says
# there is none, FAIL otherwise.
fail_row() {
  local name=$1 rc=$2 out=$3
  if [ "$STEP_SKIPPED" = 1 ]; then row "$name" "skipped" "out of the call's time budget (${BUDGET}s)"
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then row "$name" "TIMEOUT" "stopped at its cap of ${STEP_CAP}s; $(tail -n1 "$out" | cut -c1-200)"
  elif grep -qE "no usable NVIDIA GPU|libcuda.so.1 not found" "$out"; then row "$name" "no GPU" "$(first_error "$out")"
  else row "$name" "FAIL" "$(first_error "$out")"
  fi
}
# gpu_step NAME CAP_NAME OUT CMD...: a GPU step; refused for CPU placement, it runs once more
# with --allow-cpu-fallback (the refusal, naming the nodes, goes into FALLBACK_NOTE). On failure
# it writes the row itself and returns non-zero.
gpu_step() {
  local name=$1 capname=$2 out=$3; shift 3
  FALLBACK_NOTE=""
  step "$capname" "$@" > "$out" 2>&1
  local rc=$?
  if [ "$rc" != 0 ] && grep -q "would run on the CPU" "$out"; then
    FALLBACK_NOTE="with --allow-cpu-fallback ($(grep -m1 -o "[0-9]* compute node(s) of [a-z_]* would run on the CPU: .*" "$out" | cut -c1-300))"
    cp "$out" "${out%.txt}-refused.txt"
    step "$capname" "$@" --allow-cpu-fallback > "$out" 2>&1
    rc=$?
  fi
  [ "$rc" = 0 ] && return 0
  fail_row "$name" "$rc" "$out"
  return 1
}

environment() {
  local libdirs
  libdirs=$(python3 scripts/gpu_bundle.py ldpath 2>/dev/null)
  [ -n "$libdirs" ] && export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export ORT_GPU_DYLIB_PATH="$B/ort/libonnxruntime.so.1.31.1"
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
  step imports python3 - "$A/star-official" > "$out" 2>&1 <<'EOF'
import sys
sys.path.insert(0, sys.argv[1])
import torch, yaml, huggingface_hub
from timm.models.vision_transformer import Mlp, PatchEmbed, _cfg
from timm.models.layers import DropPath, to_2tuple, trunc_normal_
from timm.models.registry import register_model
from models import build_vae_var
print("torch %s, CUDA available: %s" % (torch.__version__, torch.cuda.is_available()))
EOF
  local rc=$?
  if [ "$rc" = 0 ]; then row "official benchmark's imports" "ok" "$(tail -n1 "$out")"
  else fail_row "official benchmark's imports" "$rc" "$out"
  fi
}

# The d30/1024 random-weight checkpoint and its FP16 export: CPU work, started as early as the
# binaries are there, in its own session (and process group) so that it outlives the call that
# started it; its pid is kept to stop it.
start_d30() {
  [ -f "$W/d30.status" ] && return 0
  echo "running" > "$W/d30.status"
  setsid nohup bash "$PWD/scripts/gpu-check.sh" d30-job > /dev/null 2>&1 < /dev/null &
  echo $! > "$W/d30.pid"
  row "d30/1024 checkpoint + fp16 export" "started" "in the background (gen-random-star ${GPU_CHECK_D30:---depth 30 --scales 14 --sampler}, export at ${GPU_CHECK_RES:-1024} px --precision fp16)"
}
stop_d30() {
  [ -f "$W/d30.pid" ] && kill -- -"$(cat "$W/d30.pid")" 2>/dev/null
  rm -f "$W/d30.pid"
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
  # The checkpoint is read only by the export (8 GB at d30).
  rm -rf "$W/d30ckpt"
}

receive() {
  python3 scripts/gpu_bundle.py receive "$P" "$B" || { row "bundle pieces" "FAIL" "see the call's output"; return 2; }
  # The work of another bundle is not this one's.
  if [ "$(cat "$W/.bundle-id" 2>/dev/null)" != "$(cat "$B/.bundle-id")" ]; then
    stop_d30
    find "$W" -mindepth 1 -delete 2>/dev/null
    cp "$B/.bundle-id" "$W/.bundle-id"
  fi
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
  local name="tiny ort-cuda run (--verbose)" out="$W/tiny-run.txt"
  if gpu_step "$name" tiny_run "$out" "$RUN" --model "$W/tiny-256-fp32" --backend ort-cuda --verbose \
      --prompt "a red circle" --seed 1 --out "$W/tiny.png"; then
    row "$name" "PASS" "${FALLBACK_NOTE:+$FALLBACK_NOTE; }$(grep -m3 -E "ort-cuda" "$out" | tr '\n' ' ')"
  fi
}

# CUDA graphs (--cuda-graphs, off by default until this row passes): the same directory run
# captured and uncaptured over six generations (capture happens after ONNX Runtime's warm-up
# runs, so the later ones replay graphs): token agreement and image PSNR.
cuda_graphs_row() {
  local name="CUDA graphs: captured vs uncaptured, ort-cuda" out="$W/cuda-graphs.txt"
  if gpu_step "$name" graphs "$out" "$RUN" compare --backend ort-cuda --candidate-cuda-graphs \
      --reference "$W/tiny-256-fp32" --candidate "$W/tiny-256-fp32" --prompts "$W/prompts.txt" \
      --seeds 1,2,3 --json "$W/cuda-graphs.json"; then
    row "$name" "$(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print('PASS' if r['token_agreement'] == 1.0 else 'DIFFERS')" "$W/cuda-graphs.json" 2>&1)" \
      "${FALLBACK_NOTE:+$FALLBACK_NOTE; }$(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print('token agreement %.4f, PSNR %.1f dB over 6 generations' % (r['token_agreement'], r['psnr_db']))" "$W/cuda-graphs.json" 2>&1)"
  fi
}

fixtures() {
  local v name res prec out
  for v in tiny-256:256 tiny-1024s:1024; do
    name=${v%%:*}; res=${v#*:}
    for prec in fp32 fp16; do
      [ -f "$W/$name-$prec/manifest.json" ] && continue
      out="$W/export-$name-$prec.txt"
      step export_tiny "$EXP" export --transformer "$F/$name/star.pth" --vae "$F/vqvae.pth" --text-encoder "$F/clip_tiny" \
        --resolution "$res" --precision "$prec" --quiet --out "$W/$name-$prec" > "$out" 2>&1 \
        || fail_row "export $name $prec (CPU)" "$?" "$out"
    done
  done
  row "fixture exports (CPU)" "done" "$(ls -d "$W"/tiny-*-fp* 2>/dev/null | wc -l) of 4"
  tiny_run
  printf 'a red circle on a blue background\na green square\n' > "$W/prompts.txt"
  cuda_graphs_row
  for name in tiny-256 tiny-1024s; do
    out="$W/replay-$name.txt"
    if gpu_step "replay $name fp32, ort-cuda (<= 1e-4 rel)" replay "$out" \
        "$RUN" replay --backend ort-cuda --verbose --model "$W/$name-fp32" --golden "$F/$name"; then
      row "replay $name fp32, ort-cuda (<= 1e-4 rel)" "PASS" "${FALLBACK_NOTE:+$FALLBACK_NOTE; }$(tail -n1 "$out")"
    fi
    out="$W/compare-$name.txt"
    if gpu_step "compare $name fp16 vs fp32, ort-cuda" compare "$out" "$RUN" compare --backend ort-cuda \
        --reference "$W/$name-fp32" --candidate "$W/$name-fp16" --prompts "$W/prompts.txt" --json "$W/compare-$name.json"; then
      row "compare $name fp16 vs fp32, ort-cuda" "done" "${FALLBACK_NOTE:+$FALLBACK_NOTE; }$(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print('token agreement %.4f, min logit cosine %.6f, PSNR %.1f dB' % (r['token_agreement'], r['min_logit_cosine'], r['psnr_db']))" "$W/compare-$name.json" 2>&1)"
    fi
  done
}

# Ours minus text encoding (the official benchmark does not encode text either), in seconds.
bench_seconds() {
  python3 -c "import json,sys; s=json.load(open(sys.argv[1]))['stages']; print('%.3f' % ((s['end_to_end']['median_ms']-s['text_encoder']['median_ms']-s['tokenizer']['median_ms'])/1e3))" "$1"
}
is_number() { [[ "${1:-}" =~ ^[0-9]+$ ]]; }

wait_d30() {
  local waited=0 c; c=$(cap d30_wait)
  while [ "$(cat "$W/d30.status" 2>/dev/null)" = running ] && [ "$waited" -lt "$c" ] && [ "$(left)" -gt 5 ]; do
    sleep 1; waited=$((waited + 1))
  done
  D30_WAITED=$waited
  # Whatever is still running would take the CPU from both benchmarks.
  [ "$(cat "$W/d30.status" 2>/dev/null)" = running ] && stop_d30 && echo "stopped: still running after the wait" > "$W/d30.status"
}

bench_ours() {
  local name="star-run bench d30/1024 fp16, ort-cuda" out="$W/bench-ours.txt" base peak wp
  base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -n1)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$W/mem-ours.log" 2>/dev/null &
  wp=$!
  if gpu_step "$name" bench "$out" "$RUN" bench --backend ort-cuda --verbose --model "$W/d30-fp16" \
      --warmup 1 --runs 3 --json "$W/bench-ours.json"; then
    kill "$wp" 2>/dev/null
    OURS=$(bench_seconds "$W/bench-ours.json")
    row "$name" "${OURS} s" "median of 3 without text encoding${FALLBACK_NOTE:+; $FALLBACK_NOTE}"
    peak=$(grep -E '^[0-9]+$' "$W/mem-ours.log" | sort -n | tail -n1)
    if is_number "$peak" && is_number "$base"; then
      row "peak device memory, star-run d30/1024 fp16" "$((peak - base)) MiB" "above the $base MiB in use before (nvidia-smi every 100 ms)"
    else
      row "peak device memory, star-run d30/1024 fp16" "n/a" "nvidia-smi gave '${base:-}' / '${peak:-}'"
    fi
    row "host<->device transfers (bench --json)" "$(python3 -c "import json,sys; t=json.load(open(sys.argv[1])).get('transfers'); print('reported' if t else 'n/a')" "$W/bench-ours.json")" \
      "$(python3 -c "import json,sys; t=json.load(open(sys.argv[1])).get('transfers'); print(json.dumps(t)[:400] if t else 'this star-run reports no transfers')" "$W/bench-ours.json")"
    cp "$W/bench-ours.json" "$OUTD/" 2>/dev/null
  else
    kill "$wp" 2>/dev/null
  fi
}

bench_official() {
  local name="official PyTorch d30/1024 (fp16 autocast)" out="$W/bench-official.txt" official
  step official python3 "$A/bench_official.py" --star-src "$A/star-official" --device cuda --depth 30 --res 1024 \
    --sampler --runs 3 > "$out" 2>&1
  local rc=$?
  if [ "$rc" != 0 ]; then
    if [ "$(cat "$W/gpu")" = 1 ]; then fail_row "$name" "$rc" "$out"; else row "$name" "no GPU" "$(tail -n1 "$out" | cut -c1-300)"; fi
    return
  fi
  official=$(grep -m1 -o "median [0-9.]* s" "$out" | grep -o "[0-9.][0-9.]*")
  row "$name" "${official} s" "$(grep -m1 median "$out")"
  if [ -n "${OURS:-}" ] && [ -n "$official" ]; then
    row "ratio official / ours" "$(python3 -c "print('%.2fx' % ($official / $OURS))")" "goal: > 1 and ours <= 1.5 s on an H100"
  fi
}

d30_rows() {
  wait_d30
  local st; st=$(cat "$W/d30.status" 2>/dev/null)
  if [ "$st" = done ]; then
    bench_ours
  else
    row "d30/1024 fp16 export" "FAIL" "${st:-not started} (after waiting ${D30_WAITED}s)"
  fi
  bench_official
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
  local name="tensorrt $v: tiny-256 fp32 engine replay" out="$W/trt-build.txt"
  gpu_step "$name" trt_build "$out" "$EXP" build-engine --model "$W/tiny-256-fp32" --backend tensorrt --out "$W/trt-tiny" || return
  out="$W/trt-replay.txt"
  if gpu_step "$name" trt_replay "$out" "$RUN" replay --engine "$W/trt-tiny" --golden "$F/tiny-256"; then
    row "$name" "PASS" "$(tail -n1 "$out")"
  fi
}

run_check() {
  receive || exit 2
  if [ ! -f "$B/.complete" ]; then
    row "bundle" "FAIL" "pieces missing: carry them first (python3 scripts/gpu_bundle.py plan $P)"
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
  stop-d30) stop_d30 ;;
  budget)
    sum=0
    for c in "${CAPS[@]}"; do
      IFS=: read -r n secs times <<< "$c"
      echo "$n ${secs}s x $times"; sum=$((sum + secs * times))
    done
    echo "total ${sum}s (each call's steps also stop at GPU_CHECK_BUDGET_S=$BUDGET)" ;;
  *) sed -n '2,27p' "$0"; exit 2 ;;
esac
