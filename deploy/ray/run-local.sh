#!/usr/bin/env bash
# One command: a local Ray cluster on this machine and the star_ray app (REPLICAS replicas of
# `star-run serve`, each with NUM_CPUS_PER_REPLICA CPUs) on the embedded demo model, or on
# MODEL=DIR; prints the URL. `run-local.sh stop` stops the app and the cluster.
#
#   deploy/ray/run-local.sh                     # http://127.0.0.1:8000
#   PORT=9000 REPLICAS=1 MODEL=/path/to/model deploy/ray/run-local.sh
#   SERVE_ARGS="--max-queue 8 --max-batch 4" deploy/ray/run-local.sh
#
# Needs `ray[serve]` (deploy/ray/requirements.txt) in PYTHON's environment and the release
# binary (cargo build --release).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
RAY="$(dirname "$PYTHON")/ray"
if [ "${1:-}" = "stop" ]; then
  "$RAY" stop
  exit 0
fi
STAR_RUN=${STAR_RUN:-$REPO/target/release/star-run}
PORT=${PORT:-8000}
REPLICAS=${REPLICAS:-2}
NUM_CPUS_PER_REPLICA=${NUM_CPUS_PER_REPLICA:-1}
NUM_CPUS=${NUM_CPUS:-$(( REPLICAS * NUM_CPUS_PER_REPLICA ))}
[ -x "$STAR_RUN" ] || { echo "no star-run at $STAR_RUN (cargo build --release, or STAR_RUN=...)" >&2; exit 2; }
if [ -z "${ORT_DYLIB_PATH:-}" ]; then
  ORT_DYLIB_PATH=$(ls "$REPO"/.venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* 2>/dev/null | head -n1 || true)
fi
export ORT_DYLIB_PATH STAR_RUN PORT REPLICAS NUM_CPUS_PER_REPLICA
export MODEL=${MODEL:-} SERVE_ARGS=${SERVE_ARGS:-}
# The replicas (Ray workers) import star_ray from here.
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"
export RAY_USAGE_STATS_ENABLED=0
# A single-machine cluster on the loopback address (Ray otherwise resolves "this node" to the
# machine's interface address, even after --node-ip-address 127.0.0.1).
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=${RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER:-0}
if ! "$RAY" status >/dev/null 2>&1; then
  "$RAY" start --head --node-ip-address 127.0.0.1 --num-cpus "$NUM_CPUS" --object-store-memory 100000000 \
    --include-dashboard=false --disable-usage-stats >/dev/null
fi
"$PYTHON" - <<'PY'
import os
import ray
from ray import serve
import star_ray

ray.init(address="auto", logging_level="WARNING", log_to_driver=False)
serve.start(http_options={"host": "127.0.0.1", "port": int(os.environ["PORT"])})
args = {
    "star_run": os.environ["STAR_RUN"],
    "num_replicas": int(os.environ["REPLICAS"]),
    "ray_actor_options": {"num_cpus": float(os.environ["NUM_CPUS_PER_REPLICA"])},
    "serve_args": os.environ["SERVE_ARGS"],
    "env": {"ORT_DYLIB_PATH": os.environ["ORT_DYLIB_PATH"]} if os.environ["ORT_DYLIB_PATH"] else {},
}
if os.environ["MODEL"]:
    args["model"] = os.environ["MODEL"]
serve.run(star_ray.app(args), name="star", route_prefix="/")
PY
URL="http://127.0.0.1:$PORT"
echo "star on Ray Serve ($REPLICAS replicas of star-run serve): $URL"
echo "  curl -s $URL/v1/images/generations -d '{\"prompt\": \"a red circle on a blue background\", \"seed\": 1}'"
echo "  stop: $0 stop"
