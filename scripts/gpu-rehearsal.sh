#!/usr/bin/env bash
# Rehearses the GPU check on this CPU-only machine, as the device tool will run it: a bundle is
# made (stand-ins for ONNX Runtime's CUDA libraries: the CPU build's libonnxruntime and an empty
# libonnxruntime_providers_cuda.so), a directory is laid out like the GPU machine (the working
# tree as the tool sends it, without assets/ and tests/fixtures/; `python3` inside a virtual
# environment whose site-packages hold nvidia/*/lib; a PATH without xz, tar, nvidia-smi or
# cargo), and every call of the bundle's plan runs there in order, each carrying its piece.
#
# It checks: each call fits the tool's 64 MiB with its piece; the checksums (a corrupted piece is
# refused); unpacking without xz; the CUDA library path built from python3's site-packages; the
# preflight; and a table in which every GPU row says "no GPU" and nothing else failed but the
# official benchmark's imports (the stand-in python3 has no PyTorch).
#
# Usage: scripts/gpu-rehearsal.sh [--full] [--release] [--bundle DIR]
#   default: quick (GPU_CHECK_QUICK=1 on every call: no d30 job), debug binaries, xz preset 0.
#   --full: the d30 rows too (the d30 job shrunk to a d2/256 model on this CPU).
#   --bundle DIR: rehearse with the bundle already made in DIR (scripts/gpu-bundle.sh DIR, the
#   real one with ONNX Runtime's GPU libraries) instead of making one with stand-ins.
set -euo pipefail
cd "$(dirname "$0")/.."
quick=1; profile=debug; bundle=""
while [ $# -gt 0 ]; do
  case "$1" in
    --full) quick="" ;;
    --release) profile=release ;;
    --bundle) bundle=$(cd "$2" && pwd); shift ;;
    *) echo "error: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done
R=$(mktemp -d /tmp/star-gpu-rehearsal.XXXXXX)
M="$R/machine"
fail() { echo "rehearsal: FAIL: $*" >&2; exit 1; }
say() { echo "rehearsal: $*" >&2; }

# --- the bundle, with stand-in ONNX Runtime GPU libraries ----------------------------------------
if [ -z "$bundle" ]; then
  cpu_capi=$(ls -d "$PWD"/.venv/lib/python3*/site-packages/onnxruntime/capi | head -n1)
  [ -n "$cpu_capi" ] || fail "no .venv with onnxruntime (bash scripts/setup-ort.sh)"
  mkdir -p "$R/ort"
  cp "$(ls "$cpu_capi"/libonnxruntime.so.1.* | head -n1)" "$R/ort/libonnxruntime.so.1.31.1"
  cp "$cpu_capi/libonnxruntime_providers_shared.so" "$R/ort/"
  : > "$R/ort/libonnxruntime_providers_cuda.so"
  anchors=../shared/anchors
  if [ ! -f "$anchors/bench_official.py" ]; then
    # A user's clone has no ../shared: a stand-in whose imports fail like a missing PyTorch's.
    anchors="$R/anchors"; mkdir -p "$anchors/star-official/models"
    echo 'import sys; sys.exit("stand-in: no official implementation here")' > "$anchors/bench_official.py"
    echo 'raise ImportError("stand-in: no official implementation here")' > "$anchors/star-official/models/__init__.py"
  fi
  bundle="$R/bundle"
  bash scripts/gpu-bundle.sh "$bundle" --profile "$profile" --ort-libs "$R/ort" --anchors "$anchors" --xz-preset 0 > "$R/plan.txt"
  cat "$R/plan.txt" >&2
fi

# --- a machine laid out like the GPU machine -----------------------------------------------------
python3 -m venv --without-pip "$M/venv"
sp=$("$M/venv/bin/python3" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
for f in cu13/libcudart.so.13 cu13/libcublasLt.so.13 cu13/libcublas.so.13 cu13/libcurand.so.10 \
         cu13/libnvrtc.so.13 cudnn/libcudnn.so.9 nccl/libnccl.so.2 cufile/libcufile.so.0; do
  mkdir -p "$sp/nvidia/$(dirname "$f")/lib"
  : > "$sp/nvidia/$(dirname "$f")/lib/$(basename "$f")"
done
mkdir -p "$M/path"
for t in bash sh env cat ls mkdir date sort tail head grep cut tr sed wc sleep kill timeout setsid \
         nohup cp mv rm dirname basename mktemp tee touch printf; do
  p=$(command -v "$t" || true)
  [ -n "$p" ] && [ "${p#/}" != "$p" ] && ln -sf "$p" "$M/path/$t"
done
# python3 as the GPU machine has it: the interpreter of a virtual environment, found on PATH.
MPATH="$M/path:$M/venv/bin"
for absent in xz tar nvidia-smi cargo unzip; do
  env -i PATH="$MPATH" bash -c "command -v $absent" >/dev/null 2>&1 && fail "$absent is on the stand-in PATH"
done
# The working tree as the device tool sends it (tracked and untracked-not-ignored files), with
# assets/ and tests/fixtures/ moved out as the plan says.
mkdir -p "$M/repo"
git ls-files -z --cached --others --exclude-standard | grep -zvE '^(assets|tests/fixtures)/' \
  | while IFS= read -r -d '' f; do [ -e "$f" ] && { mkdir -p "$M/repo/$(dirname "$f")"; cp -p "$f" "$M/repo/$f"; }; done
tree_bytes=$(du -sb "$M/repo" | cut -f1)
say "tree as sent: $((tree_bytes >> 10)) KiB"

# --- the calls of the plan -----------------------------------------------------------------------
python3 - "$bundle/pieces/plan.json" > "$R/calls.txt" <<'EOF'
import json, sys
for c in json.load(open(sys.argv[1]))["calls"]:
    print(c["timeout_s"], " ".join(c["carry"]), "::", c["command"])
EOF
if [ -n "$quick" ]; then mode=(GPU_CHECK_QUICK=1); else mode=("GPU_CHECK_D30=--depth 2 --scales 10 --text-layers 1" GPU_CHECK_RES=256); fi
i=0
while read -r line; do
  i=$((i + 1))
  t=${line%% *}; rest=${line#* }; carry=${rest%% :: *}; cmd=${rest#* :: }
  sent=$tree_bytes
  for c in $carry; do
    mkdir -p "$M/repo/$(dirname "$c")"
    cp "$bundle/pieces/$(basename "$c")" "$M/repo/$c"
    sent=$((sent + $(stat -c %s "$M/repo/$c")))
  done
  [ "$sent" -le $((64 << 20)) ] || fail "call $i sends $((sent >> 20)) MiB, over the device tool's 64 MiB"
  if [ "$i" = 1 ]; then
    # A piece that arrives damaged is refused, naming it, before anything is unpacked.
    cp "$M/repo/$c" "$R/good"; printf 'x' | dd of="$M/repo/$c" bs=1 seek=1000 conv=notrunc status=none
    if (cd "$M/repo" && env -i PATH="$MPATH" HOME="$M" OUT="$R/out-bad" bash -c "$cmd") > "$R/bad.txt" 2>&1; then
      fail "a corrupted piece was accepted"
    fi
    grep -q "sha256" "$R/bad.txt" || fail "the refusal of a corrupted piece does not say why: $(tail -n2 "$R/bad.txt")"
    cp "$R/good" "$M/repo/$c"; rm -rf "$M/repo/.gpu-bundle/work"
  fi
  say "call $i: carry $carry ($((sent >> 20)) MiB with the tree): $cmd"
  mkdir -p "$R/out-$i"
  (cd "$M/repo" && env -i PATH="$MPATH" HOME="$M" OUT="$R/out-$i" "${mode[@]}" timeout "$t" bash -c "$cmd") 2>&1 \
    | sed "s/^/  [call $i] /" >&2 || fail "call $i failed"
done < "$R/calls.txt"

# --- what came back --------------------------------------------------------------------------------
table="$R/out-$i/table.md"
[ -f "$table" ] || fail "the last call brought back no table.md"
cat "$table"
row() { grep -E "^\| $1" "$table" || fail "no row '$1'"; }
row "GPU " | grep -q "no GPU" || fail "the GPU row does not say 'no GPU'"
row "CUDA libraries" | grep -q "found" || fail "the CUDA library path was not built from python3's site-packages"
row "CUDA libraries" | grep -q "nvidia/cudnn/lib" || fail "cuDNN's folder is not on the library path"
row "fixture exports" | grep -q "4 of 4" || fail "the fixture exports did not all run"
for r in "tiny ort-cuda run" "replay tiny-256" "replay tiny-1024s" "compare tiny-256" "compare tiny-1024s"; do
  row "$r" | grep -q "| no GPU" || fail "row '$r' does not say 'no GPU'"
done
if [ -z "$quick" ]; then
  row "star-run bench d30" | grep -q "| no GPU" || fail "the d30 bench row does not say 'no GPU'"
  row "tensorrt" | grep -q "skipped" || fail "the tensorrt row is not skipped"
fi
bad=$(grep -E "\| (FAIL|MISSING) " "$table" | grep -v "official benchmark's imports" || true)
[ -z "$bad" ] || fail "rows failed: $bad"
(cd "$M/repo" && env -i PATH="$MPATH" bash scripts/gpu-check.sh stop-d30) || true
say "PASS ($(du -sh "$bundle/pieces" | cut -f1) of pieces, $i calls); work in $R"
rm -rf "$R"
