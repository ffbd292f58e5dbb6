#!/usr/bin/env bash
# star-run against the official implementation on the same machine, alternated, text encoding
# excluded on both sides (benches/RESULTS.md, issue 7). Needs a model exported from
# `gen-random-star --depth 16 --scales 10` at 256 px and the anchor venv:
#   PY=$(../shared/anchors/setup-torch.sh)
#   benches/scripts/compare-official.sh MODEL_DIR [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
model="${1:?usage: compare-official.sh MODEL_DIR [ROUNDS]}"
rounds="${2:-2}"
PY="${PY:-/tmp/star-anchor-venv/bin/python}"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(ls "$PWD"/.venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* | head -n1)}"
out="$(mktemp -d)"
for r in $(seq 1 "$rounds"); do
  echo "== round $r: official"
  "$PY" ../shared/anchors/bench_official.py --star-src ../shared/anchors/star-official \
    --device cpu --depth 16 --res 256 --runs 3 --threads 2 2>&1 | grep -E "median"
  echo "== round $r: star-run"
  ./target/release/star-run bench --model "$model" --warmup 1 --runs 3 --json "$out/r$r.json" | grep -E "end_to_end"
  python3 -c "import json,sys; s=json.load(open(sys.argv[1]))['stages']; print('star-run without text encoding: %.3f s' % ((s['end_to_end']['median_ms']-s['text_encoder']['median_ms']-s['tokenizer']['median_ms'])/1e3))" "$out/r$r.json"
done
