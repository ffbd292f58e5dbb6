#!/usr/bin/env bash
# Re-creates the embedded demo model (assets/demo-model) from the official demo files.
# Usage: scripts/export-demo.sh [DEMO_DIR]   (default: ../shared/demo)
set -euo pipefail
cd "$(dirname "$0")/.."
demo="${1:-../shared/demo}"
rm -rf assets/demo-model
cargo run --release -q -p star-export -- export \
  --transformer "$demo/star_demo_transformer.pth" --vae "$demo/vqvae.pth" --text-encoder "$demo" \
  --patch-nums 1,2,3,4 --default-cfg 3.0 --default-top-k 64 --default-top-p 0.9 --out assets/demo-model
