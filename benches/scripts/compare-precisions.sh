#!/usr/bin/env bash
# INT8 (and FP16, FP32) star-run against the official implementation on the same machine,
# alternated, text encoding excluded on both sides (benches/RESULTS.md, issue 9). Needs d16
# exports at 256 px of one `gen-random-star --depth 16 --scales 10` checkpoint at each
# precision (INT8 calibrated on calibration/prompts/general.txt) and the anchor venv:
#   PY=$(../shared/anchors/setup-torch.sh)
#   benches/scripts/compare-precisions.sh FP32_DIR FP16_DIR INT8_DIR [ROUNDS]
# A/B against an earlier build in the same run: BASE_RUN=/path/to/old/star-run (and
# BASE_FP32_DIR / BASE_INT8_DIR when the old build needs its own exports, e.g. an older manifest
# schema) runs it right after ours for FP32 and INT8, every round.
set -euo pipefail
cd "$(dirname "$0")/../.."
fp32="${1:?usage: compare-precisions.sh FP32_DIR FP16_DIR INT8_DIR [ROUNDS]}"
fp16="${2:?}"
int8="${3:?}"
rounds="${4:-2}"
PY="${PY:-/tmp/star-anchor-venv/bin/python}"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(ls "$PWD"/.venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* | head -n1)}"
out="$(mktemp -d)"
lscpu | grep -E "Model name"
# The CPU's matrix features (none of these on an AVX2-only CPU: grep then finds nothing).
echo "features: $(grep -o 'avx2\|avx512f\|avx512_vnni\|avx_vnni\|amx_int8\|avx512_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')"
without_text() {
  python3 -c "import json,sys; s=json.load(open(sys.argv[1]))['stages']; print('%s without text encoding: %.3f s' % (sys.argv[2], (s['end_to_end']['median_ms']-s['text_encoder']['median_ms']-s['tokenizer']['median_ms'])/1e3))" "$1" "$2"
}
for r in $(seq 1 "$rounds"); do
  echo "== round $r: official"
  "$PY" ../shared/anchors/bench_official.py --star-src ../shared/anchors/star-official \
    --device cpu --depth 16 --res 256 --runs 3 --threads 2 2>&1 | grep -E "median"
  for v in fp32:"$fp32" int8:"$int8" fp16:"$fp16"; do
    name="${v%%:*}"; dir="${v#*:}"
    if [ "$name" = fp16 ] && [ "$r" -gt 1 ]; then continue; fi
    "${STAR_RUN:-./target/release/star-run}" bench --model "$dir" --warmup 1 --runs 3 --json "$out/$name-r$r.json" > "$out/$name-r$r.txt"
    grep -E "^step\[0[09]\]|^decoder" "$out/$name-r$r.txt" | sed "s/^/$name  /"
    without_text "$out/$name-r$r.json" "star-run $name"
    if [ -n "${BASE_RUN:-}" ] && [ "$name" != fp16 ]; then
      bdir="$dir"
      [ "$name" = fp32 ] && bdir="${BASE_FP32_DIR:-$dir}"
      [ "$name" = int8 ] && bdir="${BASE_INT8_DIR:-$dir}"
      "$BASE_RUN" bench --model "$bdir" --warmup 1 --runs 3 --json "$out/base-$name-r$r.json" > "$out/base-$name-r$r.txt"
      without_text "$out/base-$name-r$r.json" "base star-run $name"
    fi
  done
done
