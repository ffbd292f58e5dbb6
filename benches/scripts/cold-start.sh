#!/usr/bin/env bash
# One-shot star-run: seconds from the start to each scale's progress line, and the peak RSS
# (VmHWM) when scale STOP is reported; the run is then stopped (a d30/1024 generation does not
# fit a 2-core CPU budget). benches/RESULTS.md, issue 7.
#   [STAR_RUN=path/to/star-run] benches/scripts/cold-start.sh MODEL_DIR [STOP=2]
set -uo pipefail
cd "$(dirname "$0")/../.."
model="${1:?usage: cold-start.sh MODEL_DIR [STOP]}"
stop="${2:-2}"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(ls "$PWD"/.venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* | head -n1)}"
start=$(date +%s.%N)
"${STAR_RUN:-./target/release/star-run}" --model "$model" --prompt "a red circle on a blue background" \
  --out "$(mktemp -d)/cold.png" 2>&1 | while IFS= read -r line; do
  printf '%7.2f s  %s\n' "$(echo "$(date +%s.%N) - $start" | bc)" "$line"
  case "$line" in "scale $(printf '%2d' "$stop")"*)
    # By its arguments: STAR_RUN may name a binary of any name.
    pid=$(pgrep -f -- "--model $model --prompt" | head -1)
    grep -E "VmHWM" "/proc/$pid/status"
    kill -TERM "$pid";;
  esac
done
